"""W&B sweep files as users bring them (tests/wandb_sweeps/, one per feature), W&B's
conventions, and the Optuna dashboard."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from ablations import sweep_file, wandb_log
from ablations.cli import main
from tests.helpers import dashboard_detail, load, make_study, run_worker, write_sweep

CORPUS = sorted((Path(__file__).parent / "wandb_sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_every_wandb_style_file_passes_dry_run(path, in_tmp, capsys):
    assert main(["sweep", str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    raw = yaml.safe_load(path.read_text())
    for key in ("program", "command"):
        assert (f"{key}: accepted and ignored" in err) == (key in raw)
    strict = "strict" in raw.get("early_terminate", {})
    assert ("early_terminate.strict: accepted and ignored" in err) == strict
    assert not Path("runs").exists()  # a dry run writes nothing


def _draws(sweep: sweep_file.Sweep, n: int = 200) -> dict[str, list]:
    from ablations.study import suggest

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out: dict[str, list] = {k: [] for k in sweep.swept}
    for _ in range(n):
        trial = study.ask()
        for k, v in suggest(trial, sweep).items():
            out[k].append(v)
        study.tell(trial, 0.0)
    return out


@pytest.mark.parametrize("path", [p for p in CORPUS if "grid" not in p.stem], ids=lambda p: p.stem)
def test_sampled_values_respect_their_distributions(path):
    sweep = sweep_file.load(path)
    for key, values in _draws(sweep).items():
        p = sweep.params[key]
        if p.values is not None:
            assert set(values) <= set(p.values) and len(set(values)) == len(p.values)
            continue
        assert all(p.low <= v <= p.high for v in values), key
        if p.step is not None:
            assert all(
                abs((v - p.low) / p.step - round((v - p.low) / p.step)) < 1e-6 for v in values
            )
        mid = sorted(values)[len(values) // 2]
        if p.log:  # half the draws below the geometric mean, not the arithmetic one
            assert abs(math.log(mid) - (math.log(p.low) + math.log(p.high)) / 2) < 0.25 * math.log(
                p.high / p.low
            ), key
        elif p.step is None:
            assert abs(mid - (p.low + p.high) / 2) < 0.2 * (p.high - p.low), key


def test_exponent_distributions_and_numbers_in_every_spelling():
    logs = sweep_file.load(Path(__file__).parent / "wandb_sweeps/log_exponents.yaml").params
    assert logs["train.lr"].low == pytest.approx(1e-4, rel=1e-3)
    assert logs["train.lr"].high == pytest.approx(0.1, rel=1e-2)
    assert logs["train.warmup_epochs"].low == pytest.approx(math.exp(-4.6))
    assert logs["train.warmup_epochs"].high == pytest.approx(1.0)
    grid = sweep_file.load(Path(__file__).parent / "wandb_sweeps/program_grid.yaml")
    assert grid.params["train.lr"].values == (0.05,)  # written 5E-2
    assert grid.params["train.momentum"].values == (0.9,)  # written .9
    nested = sweep_file.load(Path(__file__).parent / "wandb_sweeps/nested_hyperband.yaml")
    assert {"data.dataset", "data.subset", "model.variant", "model.width"} <= set(nested.params)
    assert nested.hyperband == {"min_iter": 1, "eta": 3, "max_iter": None}


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            {"distribution": "normal", "mu": 0.05, "sigma": 0.01},
            "normal has no bounded range, which a sweep over a model setting needs; the "
            "nearest that works: uniform with min: mu - 2*sigma and max: mu + 2*sigma",
        ),
        (
            {"distribution": "log_normal", "mu": -3, "sigma": 1},
            "the nearest that works: log_uniform_values",
        ),
        (
            {"distribution": "q_log_uniform_values", "min": 0.001, "max": 0.1, "q": 0.001},
            "on a log scale is not one of Optuna's distributions; the nearest that works: "
            "log_uniform_values",
        ),
        (
            {"values": [0.01, 0.1], "probabilities": [0.9, 0.1]},
            "the nearest that works: the same values without probabilities",
        ),
        ({"distribution": "constant"}, "distribution constant needs 'value'"),
        ({"distribution": "q_uniform", "min": 0.1, "max": 0.2, "q": 1}, "is wider than the range"),
    ],
)
def test_distributions_optuna_cannot_run_are_refused_with_the_nearest(tmp_path, spec, message):
    raw = {
        "name": "t",
        "method": "random",
        "run_cap": 2,
        "parameters": {"data.dataset": {"value": "synthetic"}, "train.lr": spec},
    }
    with pytest.raises(sweep_file.SweepError) as err:
        sweep_file.parse(raw)
    assert message in str(err.value)


def test_wandb_project_entity_and_dir_follow_the_precedence(monkeypatch, tmp_path):
    for key in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    trial_dir = tmp_path / "trial"
    assert wandb_log.target(None, None, trial_dir) == {
        "project": "allconv-ablations",
        "entity": None,
        "save_dir": trial_dir,
    }
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_ENTITY", "env-team")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    got = wandb_log.target(None, None, trial_dir)
    assert got == {
        "project": "env-project",
        "entity": "env-team",
        "save_dir": tmp_path / "wandb-dir",
    }
    # the sweep file's own project and entity win over the environment
    assert wandb_log.target("file-project", "file-team", trial_dir)["project"] == "file-project"
    assert wandb_log.target("file-project", "file-team", trial_dir)["entity"] == "file-team"


def test_only_categorical_swept_values_become_tags(tmp_path, in_tmp, monkeypatch):
    from ablations import wandb_logger

    seen = []

    def fake(self, **kwargs):
        seen.append(kwargs["tags"])
        raise RuntimeError("no W&B here")  # the trial goes on without it

    monkeypatch.setattr(wandb_logger.SafeWandbLogger, "__init__", fake)
    file = write_sweep(
        tmp_path / "s.yaml",
        method="random",
        run_cap=1,
        parameters={"train.lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1}},
    )
    run_worker(file, wandb="offline")
    (tags,) = seen
    assert any(t.startswith("model.variant=") for t in tags)
    assert not any(t.startswith("train.lr=") for t in tags)


def test_studies_name_their_metric_and_trials_report_learning_curves(tmp_path, in_tmp):
    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={"train.epochs": {"value": 2}, "model.variant": {"value": "all-cnn"}},
    )
    run_worker(file)
    study = load()
    assert study.metric_names == ["val/error"]
    (trial,) = study.get_trials()
    assert sorted(trial.intermediate_values) == [0, 1]
    assert trial.intermediate_values[1] == pytest.approx(trial.user_attrs["val/error"])


def test_dashboard_serves_the_study_on_localhost(tmp_path, in_tmp):
    make_study(in_tmp)
    detail = dashboard_detail(["paper"], in_tmp)
    assert detail["study_name"] == "paper" and len(detail["trials"]) == 12
    assert detail["objective_names"] == ["val/error"]  # the named objective it shows


def test_dashboard_of_an_unknown_study_exits_2(tmp_path, in_tmp, capsys):
    assert main(["dashboard", "nope"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["program_grid", "command_random", "constant_and_categorical"])
def test_three_corpus_files_run_for_real(name, in_tmp):
    path = Path(__file__).parent / "wandb_sweeps" / f"{name}.yaml"
    sweep = sweep_file.load(path)
    run_worker(path, study=sweep.name)
    study = load(sweep.name)
    states = [t.user_attrs.get("state") for t in study.get_trials()]
    assert states == ["complete"] * (sweep.run_cap or len(sweep.cells()[0]))
    assert study.metric_names == [sweep.metric]


def test_wandb_project_from_the_environment_lands_in_the_run_files(tmp_path, in_tmp):
    """`WANDB_PROJECT=from-env ablate sweep FILE`: the trial's offline run file says so. The
    sweep runs in processes of its own, as a user runs it: a second W&B run made inside the
    test process (after another test's) wrote no run record."""
    file = write_sweep(tmp_path / "s.yaml", parameters={"model.variant": {"value": "all-cnn"}})
    # no WANDB_* from this process: an in-process W&B run of an earlier test leaves some set
    # (then `wandb leet inspect` looked for a latest-run link inside the run folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_PROJECT"] = "from-env"
    cmd = [sys.executable, "-m", "ablations.cli", "sweep", str(file), "--wandb", "offline"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = Path("runs/t/trials").glob("*/wandb/offline-run-*")
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run(
        [str(wandb), "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in env.items() if k != "WANDB_PROJECT"},
    )
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    runs = [r["run"] for r in records if r["type"] == "run"]
    assert runs, (out.stdout[-3000:], out.stderr[-2000:])
    assert runs[0]["project"] == "from-env"


def test_metric_target_ends_a_random_sweep_once_reached(tmp_path, in_tmp):
    """W&B's `metric.target`: no new trial once one reaches it (every val/error <= 100)."""
    file = write_sweep(
        tmp_path / "s.yaml",
        method="random",
        run_cap=5,
        metric={"name": "val/error", "goal": "minimize", "target": 100},
        parameters={
            "model.variant": {"value": "all-cnn"},
            "train.lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1},
        },
    )
    run_worker(file)
    assert [t.user_attrs["state"] for t in load().get_trials()] == ["complete"]
    with pytest.raises(sweep_file.SweepError, match="metric.target='low' must be a number"):
        sweep_file.parse({**yaml.safe_load(file.read_text()), "metric": {"target": "low"}})
