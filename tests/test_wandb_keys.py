"""Every key and parameter form of W&B's current sweep schema (its `config/schema.json`, 2026)
is honoured, accepted and ignored with a note, or refused with why and what to write
instead; multi-objective sweeps (`metrics:`) and `metric.impute` run for real."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from ablations import sweep_file
from ablations.cli import main
from ablations.export import pareto
from ablations.impute import ImputingSampler, _ImputedStudy
from ablations.study import sampler_for
from tests.helpers import dashboard_detail, load, run_worker

# W&B's schema, as its JSON schema lists them: every top-level key, every key of `metric`,
# every parameter distribution. Each must have a case below.
SCHEMA_KEYS = (
    "apiVersion", "kind", "controller", "description", "program", "job", "image_uri",
    "entity", "project", "method", "command", "name", "run_cap", "metric", "metrics",
    "scheduler", "early_terminate", "parameters",
)  # fmt: skip
METRIC_KEYS = ("name", "goal", "target", "impute", "impute_while_running")
DISTRIBUTIONS = (
    "constant", "categorical", "categorical_w_probabilities", "int_uniform", "uniform",
    "log_uniform", "log_uniform_values", "inv_log_uniform", "inv_log_uniform_values",
    "q_uniform", "q_log_uniform", "q_log_uniform_values", "normal", "q_normal", "log_normal",
    "q_log_normal", "beta", "q_beta",
)  # fmt: skip
FAST = {"data.dataset": {"value": "synthetic"}}


def raw(**over) -> dict:
    out = {
        "name": "t",
        "method": "bayes",
        "run_cap": 2,
        "metric": {"name": "val/error", "goal": "minimize"},
        "parameters": {**FAST, "train.lr": {"distribution": "uniform", "min": 0.01, "max": 0.1}},
    }
    out.update(over)
    return out


# (what the case covers, the file's changes, what happens: note TEXT | error TEXT | a check)
HONOURED = [
    ("description", raw(description="d"), lambda s: s.description == "d"),
    ("entity", raw(entity="e"), lambda s: s.entity == "e"),
    ("project", raw(project="p"), lambda s: s.project == "p"),
    ("method", raw(method="random"), lambda s: s.method == "random"),
    ("name", raw(name="my-sweep"), lambda s: s.name == "my-sweep"),
    ("run_cap", raw(run_cap=5), lambda s: s.run_cap == 5),
    ("parameters", raw(), lambda s: s.swept == ["train.lr"]),
    ("metric.name", raw(metric={"name": "val/loss"}), lambda s: s.metric == "val/loss"),
    ("metric.goal", raw(metric={"name": "val/error", "goal": "maximize"}),
     lambda s: s.goal == "maximize"),
    ("metric.target", raw(metric={"name": "val/error", "target": 5}), lambda s: s.target == 5),
    ("metric.impute", raw(metric={"name": "val/error", "impute": "worst"}),
     lambda s: s.impute == {"val/error": "worst"} and isinstance(sampler_for(s), ImputingSampler)),
    ("metric.impute_while_running",
     raw(metric={"name": "val/error", "impute_while_running": "false"}),
     lambda s: s.liar is False and sampler_for(s)._constant_liar is False),
    ("metric.impute_while_running worst",
     raw(metric={"name": "val/error", "impute_while_running": "worst"}),
     lambda s: s.liar is True and sampler_for(s)._constant_liar is True),
    ("metrics",
     raw(metric=None, metrics=[{"name": "val/error"}, {"name": "fit_seconds", "goal": "maximize"}]),
     lambda s: s.multi and s.objectives == [("val/error", "minimize"), ("fit_seconds", "maximize")]
     and s.metric == "val/error"),
    ("early_terminate", raw(early_terminate={"type": "hyperband", "min_iter": 1}),
     lambda s: s.hyperband == {"min_iter": 1, "eta": 3, "max_iter": None}),
]  # fmt: skip
IGNORED = [
    ("apiVersion", raw(apiVersion="v1"), "apiVersion: accepted and ignored"),
    ("kind", raw(kind="sweep"), "kind: accepted and ignored"),
    ("job", raw(job="e/p/job:latest"), "job: accepted and ignored"),
    ("image_uri", raw(image_uri="docker.io/x:1"), "image_uri: accepted and ignored"),
    ("program", raw(program="train.py"), "program: accepted and ignored"),
    ("command", raw(command=["${env}", "python"]), "command: accepted and ignored"),
    ("controller", raw(controller={"type": "local"}), "controller: accepted and ignored"),
    ("scheduler", raw(scheduler={"engine": "wandb"}),
     "scheduler: accepted and ignored (engine wandb is W&B's own bayes search"),
    ("metric.impute random", raw(method="random", metric={"name": "val/error", "impute": "best"}),
     "metric.impute: accepted and ignored (only a bayes search learns from past trials"),
    ("metric.impute_while_running random",
     raw(method="random", metric={"name": "val/error", "impute_while_running": "worst"}),
     "metric.impute_while_running: accepted and ignored (method random"),
    ("early_terminate.s", raw(early_terminate={"type": "hyperband", "max_iter": 9, "s": 2}),
     "early_terminate.s: accepted and ignored"),
    ("early_terminate.strict",
     raw(early_terminate={"type": "hyperband", "min_iter": 1, "strict": True}),
     "early_terminate.strict: accepted and ignored"),
]  # fmt: skip
REFUSED = [
    ("kind other", raw(kind="job"), "kind='job': a sweep file's kind is sweep"),
    ("apiVersion type", raw(apiVersion=1), "apiVersion: expected a string"),
    ("method custom", raw(method="custom"),
     "method=custom hands the search to a scheduler's own code"),
    ("scheduler optuna", raw(scheduler={"engine": "optuna", "source": "opt.py"}),
     "scheduler.engine=optuna: the search would run the code in opt.py, and this tool does not "
     "run code named in a sweep file"),
    ("scheduler ax", raw(scheduler={"engine": "ax"}), "scheduler.engine=ax: the search would run"),
    ("scheduler wandb with source", raw(scheduler={"engine": "wandb", "source": "x.py"}),
     "the code in x.py"),
    ("scheduler engine", raw(scheduler={"engine": "hyperopt"}),
     "scheduler.engine='hyperopt' is not one of the valid values: optuna, ax, wandb"),
    ("scheduler key", raw(scheduler={"engine": "wandb", "budget": 3}),
     "scheduler: unknown key 'budget'"),
    ("metric.impute value", raw(metric={"name": "val/error", "impute": "mean"}),
     "metric.impute='mean' is not one of the valid values: latest, best, worst"),
    ("metric.impute_while_running latest",
     raw(metric={"name": "val/error", "impute_while_running": "latest"}),
     "Optuna's TPE can count a running trial only as its worst (constant liar); write worst"),
    ("metric.impute_while_running best",
     raw(metric={"name": "val/error", "impute_while_running": "best"}),
     "write worst, or false"),
    ("metric and metrics", raw(metrics=[{"name": "val/error"}, {"name": "macs"}]),
     "metric and metrics: give one"),
    ("metrics of one", raw(metric=None, metrics=[{"name": "val/error"}]),
     "metrics: expected a list of two or more"),
    ("metrics twice", raw(metric=None, metrics=[{"name": "macs"}, {"name": "macs"}]),
     "an objective is given twice"),
    ("metrics name", raw(metric=None, metrics=[{"name": "val/error"}, {"name": "flops"}]),
     "metrics[1].name='flops' is not one of the valid values"),
    ("metrics target", raw(metric=None, metrics=[{"name": "val/error", "target": 3},
                                                  {"name": "macs"}]),
     "metrics[0].target: not with several objectives"),
    ("metrics pruned",
     raw(metric=None, metrics=[{"name": "val/error"}, {"name": "macs"}],
         early_terminate={"type": "hyperband", "min_iter": 1}),
     "early_terminate with metrics: Optuna's pruners compare one objective"),
    ("metric cost", raw(metric={"name": "macs"}), "metric.name='macs' is not one of the valid"),
]  # fmt: skip


def _covered(cases: list) -> set[str]:
    return {what.split(" ")[0].split(".")[0] for what, *_ in cases}


def test_every_schema_key_has_a_case():
    covered = _covered(HONOURED + IGNORED + REFUSED)
    assert set(SCHEMA_KEYS) <= covered, set(SCHEMA_KEYS) - covered
    metric = {
        what.split(" ")[0].split(".")[1] for what, *_ in HONOURED if what.startswith("metric.")
    }
    assert set(METRIC_KEYS) <= metric, set(METRIC_KEYS) - metric
    assert set(DISTRIBUTIONS) == {d for d, *_ in PARAMETERS}


def _clean(r: dict) -> dict:
    return {k: v for k, v in r.items() if v is not None}


@pytest.mark.parametrize("what,r,check", HONOURED, ids=[c[0] for c in HONOURED])
def test_honoured(what, r, check):
    assert check(sweep_file.parse(_clean(r)))


@pytest.mark.parametrize("what,r,note", IGNORED, ids=[c[0] for c in IGNORED])
def test_accepted_and_ignored_with_one_note(what, r, note):
    sweep = sweep_file.parse(_clean(r))
    assert [n for n in sweep.notes if n.startswith(note)], sweep.notes


@pytest.mark.parametrize("what,r,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_why(what, r, message):
    with pytest.raises(sweep_file.SweepError) as err:
        sweep_file.parse(_clean(r))
    assert message in str(err.value)


def test_a_refused_file_stops_the_sweep_in_one_line_and_writes_nothing(tmp_path, in_tmp, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw(scheduler={"engine": "optuna", "source": "opt.py"})))
    assert main(["sweep", str(path), "--wandb", "disabled"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "does not run code named in a sweep file" in line
    assert not Path("runs").exists()


# every W&B distribution: the range it runs as, or refused with the nearest that works
PARAMETERS = [
    ("constant", {"distribution": "constant", "value": 0.05}, (0.05,)),
    ("categorical", {"distribution": "categorical", "values": [0.01, 0.1]}, (0.01, 0.1)),
    ("categorical_w_probabilities",
     {"distribution": "categorical_w_probabilities", "values": [0.01, 0.1],
      "probabilities": [0.9, 0.1]},
     "Optuna draws categorical values with equal probability; the nearest that works: the same "
     "values without probabilities"),
    ("int_uniform", {"distribution": "int_uniform", "min": 1, "max": 4}, ("int", 1, 4)),
    ("uniform", {"distribution": "uniform", "min": 0.01, "max": 0.1}, ("lin", 0.01, 0.1)),
    ("log_uniform", {"distribution": "log_uniform", "min": -4.6, "max": -2.3},
     ("log", math.exp(-4.6), math.exp(-2.3))),
    ("log_uniform_values", {"distribution": "log_uniform_values", "min": 0.01, "max": 0.1},
     ("log", 0.01, 0.1)),
    ("inv_log_uniform", {"distribution": "inv_log_uniform", "min": 2.3, "max": 4.6},
     ("log", math.exp(-4.6), math.exp(-2.3))),
    ("inv_log_uniform_values",
     {"distribution": "inv_log_uniform_values", "min": 0.01, "max": 0.1}, ("log", 0.01, 0.1)),
    ("q_uniform", {"distribution": "q_uniform", "min": 0.01, "max": 0.1, "q": 0.01},
     ("step", 0.01, 0.1)),
    ("q_log_uniform", {"distribution": "q_log_uniform", "min": -4.6, "max": -2.3, "q": 0.01},
     "on a log scale is not one of Optuna's distributions"),
    ("q_log_uniform_values",
     {"distribution": "q_log_uniform_values", "min": 0.01, "max": 0.1, "q": 0.01},
     "on a log scale is not one of Optuna's distributions"),
    ("normal", {"distribution": "normal", "mu": 0.05, "sigma": 0.01},
     "the nearest that works: uniform with min: mu - 2*sigma"),
    ("q_normal", {"distribution": "q_normal", "mu": 0.05, "sigma": 0.01},
     "the nearest that works: q_uniform"),
    ("log_normal", {"distribution": "log_normal", "mu": -3, "sigma": 1},
     "the nearest that works: log_uniform_values"),
    ("q_log_normal", {"distribution": "q_log_normal", "mu": -3, "sigma": 1},
     "the nearest that works: log_uniform_values"),
    ("beta", {"distribution": "beta", "a": 1, "b": 1}, "the nearest that works: uniform"),
    ("q_beta", {"distribution": "q_beta", "a": 1, "b": 1}, "the nearest that works: q_uniform"),
]  # fmt: skip


@pytest.mark.parametrize("dist,spec,want", PARAMETERS, ids=[c[0] for c in PARAMETERS])
def test_every_distribution_runs_as_its_range_or_is_refused_with_the_nearest(dist, spec, want):
    key = "data.subset" if dist == "int_uniform" else "train.lr"
    r = raw(parameters={**FAST, key: spec})
    if isinstance(want, str):
        with pytest.raises(sweep_file.SweepError) as err:
            sweep_file.parse(r)
        assert want in str(err.value)
        return
    p = sweep_file.parse(r).params[key]
    if isinstance(want[0], float):
        assert p.values == want
        return
    kind, low, high = want
    assert (p.low, p.high) == (pytest.approx(low), pytest.approx(high))
    assert p.log == (kind == "log") and (p.step is not None) == (kind == "step")


def test_nested_parameter_blocks_are_dotted_keys():
    r = raw(parameters={"data": {"parameters": {"dataset": {"value": "synthetic"}}},
                        "train": {"parameters": {"lr": {"values": [0.01, 0.1]}}}})  # fmt: skip
    assert sweep_file.parse(r).params["train.lr"].values == (0.01, 0.1)


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("sweeps/*.yaml")),
                         ids=lambda p: p.name)  # fmt: skip
def test_every_shipped_sweep_file_takes_only_keys_honoured_here(path):
    """Each shipped file parses with no key ignored: what it says is what runs."""
    sweep = sweep_file.load(path)
    assert sweep.notes == [], sweep.notes


# --- imputation ------------------------------------------------------------------------------


def _study_with(outcomes: list[tuple[str, float | None]], sweep) -> optuna.Study:
    study = optuna.create_study(directions=[g for _, g in sweep.objectives])
    dist = {"train.lr": FloatDistribution(0.01, 0.1)}
    for i, (state, value) in enumerate(outcomes):
        attrs = {"state": state}
        if state != "complete":
            attrs["curves"] = {"epoch": [0, 1], "val/error": [70.0 + i, None]}
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE if state == "complete" else TrialState.FAIL,
                value=value, params={"train.lr": 0.01 + 0.01 * i}, distributions=dist,
                user_attrs=attrs,
            )
        )  # fmt: skip
    return study


@pytest.mark.parametrize("rule,want", [("worst", 20.0), ("best", 10.0), ("latest", None)])
def test_impute_tells_the_sampler_failed_and_diverged_trials_as_that_value(rule, want):
    sweep = sweep_file.parse(raw(metric={"name": "val/error", "impute": rule}))
    study = _study_with(
        [("complete", 10.0), ("complete", 20.0), ("failed", None), ("diverged", None),
         ("interrupted", None)],
        sweep,
    )  # fmt: skip
    seen = _ImputedStudy(study, sweep)._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    values = {t.number: t.value for t in seen}
    # latest: each trial's own last finite value (its curve's epoch 0: 70 + its number)
    expect = {2: want or 72.0, 3: want or 73.0}
    assert values == {0: 10.0, 1: 20.0, **expect}  # the interrupted trial is no result
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 3  # the study unchanged
    sampler = sampler_for(sweep)
    trial = optuna.create_study(sampler=sampler).ask()  # the wrapped TPE samples
    assert 0.01 <= trial.suggest_float("train.lr", 0.01, 0.1) <= 0.1


# --- files with the new keys, run for real ---------------------------------------------------

CORPUS = Path(__file__).parent / "wandb_sweeps"


def test_a_bayes_file_with_launch_keys_and_impute_runs(in_tmp, capsys):
    path = CORPUS / "launch_keys_bayes.yaml"
    sweep = sweep_file.load(path)
    assert {n.split(":")[0] for n in sweep.notes} == {
        "apiVersion", "kind", "job", "image_uri", "scheduler"
    }  # fmt: skip
    run_worker(path, study=sweep.name)
    study = load(sweep.name)
    assert [t.user_attrs["state"] for t in study.get_trials()] == ["complete", "complete"]
    assert isinstance(sampler_for(sweep), ImputingSampler) and sweep.liar is True


def test_a_multi_objective_random_sweep_runs_and_its_export_shows_the_front(in_tmp, capsys):
    path = CORPUS / "multi_objective_random.yaml"
    sweep = sweep_file.load(path)
    run_worker(path, study=sweep.name)
    study = load(sweep.name)
    assert study.metric_names == ["val/error", "macs"]
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert t.values == [t.user_attrs["val/error"], t.user_attrs["macs"]]
    # status and optuna-dashboard name both objectives
    assert main(["status", sweep.name]) == 0
    assert "objectives: val/error (minimize), macs (minimize)" in capsys.readouterr().out
    detail = dashboard_detail([sweep.name], in_tmp)
    assert detail["objective_names"] == ["val/error", "macs"] and len(detail["directions"]) == 2
    assert main(["export", sweep.name]) == 0
    out = Path(f"runs/{sweep.name}/export")
    rows = pd.read_csv(out / "trials.csv")
    # the front by hand: no other trial at least as good on both and better on one
    pts = {r.trial: (r["val/error"], r.macs) for _, r in rows.iterrows()}
    for n, (e, m) in pts.items():
        beaten = any(
            e2 <= e and m2 <= m and (e2 < e or m2 < m) for k, (e2, m2) in pts.items() if k != n
        )
        assert bool(rows.set_index("trial").loc[n, "pareto"]) == (not beaten)
    assert {t.number for t in study.best_trials} == set(rows.loc[rows["pareto"], "trial"])
    summary = pd.read_csv(out / "summary.csv")
    assert {"pareto params", "pareto macs", "pareto fit_seconds"} <= set(summary.columns)
    assert (out / "pareto.png").stat().st_size > 10_000 and (out / "pareto.md").exists()


def test_the_front_on_seed_means():
    # error, cost: (1, 3) and (2, 1) are optimal; (2, 3) is beaten by both; a tie stays
    assert pareto.front([1, 2, 2, 1, math.nan], [3, 1, 3, 3, 0]) == [
        True, True, False, True, False,
    ]  # fmt: skip
