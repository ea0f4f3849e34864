import statistics
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from ablations import export as E
from ablations import settings as S
from ablations import storage as ST
from ablations import sweep as SW
from ablations import sweep_file as SF
from ablations.cli import main
from tests.conftest import tree

VARIANTS = ["base", "all-cnn"]
LRS = [0.1, 0.01]
SEEDS = [0, 1, 2]


def make_study(root: Path, name: str = "paper") -> optuna.Study:
    """A realistic finished study: 2 variants x 2 lrs x 3 seeds on CIFAR-10's protocol,
    with one failed and one diverged trial and known metrics."""
    raw = {"name": name, "method": "grid", "metric": {"name": "val/error", "goal": "minimize"},
           "parameters": {"data.dataset": {"value": "cifar10"}, "train.epochs": {"value": 350},
                          "model.variant": {"values": VARIANTS}, "train.lr": {"values": LRS},
                          "seed": {"values": SEEDS}}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    sweep = SF.load(root / f"{name}.yaml")
    study = SW.open_study(sweep, ST.default_url(name, root / "runs"), name, create=True)
    cells, _ = sweep.cells()
    for i, cell in enumerate(reversed(cells)):  # stored out of order on purpose
        settings = S.resolve({**sweep.base, **cell})
        flat = S.flat_with_name(settings, S.model_spec(settings))
        val = 10 + 3 * VARIANTS.index(cell["model.variant"]) + 100 * cell["train.lr"] \
            + cell["seed"] * 0.5
        attrs = {"cell": SF.cell_id(cell), "settings": flat, "params": 954_730,
                 "macs": 1, "val/error": val, "test/error": val - 1, "best_epoch": 300,
                 "epochs_run": 350, "fit_seconds": 100.0 + i, "images_per_second": 500.0,
                 "device": "test", "wandb_run_id": f"w{i}", "git_commit": "abc",
                 "state": "complete"}
        state, value = TrialState.COMPLETE, val
        if cell == {"model.variant": "base", "train.lr": 0.1, "seed": 2}:
            attrs.update(state="diverged", error_message="non-finite training loss")
            attrs.pop("val/error"), attrs.pop("test/error")
            state, value = TrialState.FAIL, None
        if cell == {"model.variant": "all-cnn", "train.lr": 0.01, "seed": 1}:
            attrs.update(state="failed", error_message="RuntimeError: boom")
            attrs.pop("val/error"), attrs.pop("test/error")
            state, value = TrialState.FAIL, None
        dists = {k: CategoricalDistribution(sweep.params[k].values) for k in cell}
        study.add_trial(create_trial(state=state, value=value, params=cell,
                                     distributions=dists, user_attrs=attrs))
    return study


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_study(tmp_path)


def test_trials_frame_matches_the_study_column_by_column(study):
    df = E.trials_frame(study)
    trials = {t.number: t for t in study.get_trials()}
    assert len(df) == len(trials) == 12
    for _, row in df.iterrows():
        t = trials[row["trial"]]
        s = t.user_attrs["settings"]
        assert row["study"] == "paper"
        assert row["state"] == t.user_attrs["state"]
        for key in S.SCHEMA:
            want = s[key]
            assert (pd.isna(row[key]) and want is None) or row[key] == want, key
        assert row["model.name"] == s["model.name"]
        for key in E.RESULT_COLUMNS:
            want = t.user_attrs.get(key)
            assert (pd.isna(row[key]) and want is None) or row[key] == want, key
        assert row["error_message"] == t.user_attrs.get("error_message") or (
            pd.isna(row["error_message"]) and "error_message" not in t.user_attrs)
        assert row["datetime_start"] == t.datetime_start.isoformat()
    # ordered by the swept factors in the file's order, then seed, then trial
    keys = list(zip(df["model.variant"].map(VARIANTS.index), df["train.lr"].map(LRS.index),
                    df["seed"], df["trial"]))
    assert keys == sorted(keys)
    assert set(df["state"]) == {"complete", "diverged", "failed"}


def test_summary_means_and_stds(study):
    trials, summary, _, _ = E.build(study)
    assert len(summary) == 4  # variant x lr
    for _, row in summary.iterrows():
        v, lr = row["model.variant"], row["train.lr"]
        ok = [s for s in SEEDS if (v, lr, s) not in {("base", 0.1, 2), ("all-cnn", 0.01, 1)}]
        vals = [10 + 3 * VARIANTS.index(v) + 100 * lr + s * 0.5 for s in ok]
        assert row["n"] == len(ok)
        assert row["n_failed"] == 3 - len(ok)
        assert row["val/error mean"] == pytest.approx(statistics.mean(vals))
        assert row["val/error std"] == pytest.approx(statistics.stdev(vals))
        assert row["test/error mean"] == pytest.approx(statistics.mean(vals) - 1)
        assert row["params"] == 954_730


def test_select_by_validation_reports_test_at_the_chosen_lr(study):
    _, summary, _, _ = E.build(study, select_by="val/error", over=["train.lr"])
    assert list(summary["model.name"]) == ["Model C", "All-CNN-C"]
    assert list(summary["train.lr"]) == [0.01, 0.01]  # lower val error at 0.01
    allcnn = summary.iloc[1]
    vals = [10 + 3 + 1 + s * 0.5 for s in (0, 2)]  # seed 1 failed at 0.01
    assert allcnn["test/error mean"] == pytest.approx(statistics.mean(vals) - 1)
    assert allcnn["selected_by"] == "val/error"


def test_paper_join_and_difference(study):
    _, summary, _, _ = E.build(study, select_by="val/error", over=["train.lr"])
    row = summary.set_index("model.name").loc["All-CNN-C"]
    assert row["paper test/error"] == 9.08
    assert row["Δ test/error"] == pytest.approx(row["test/error mean"] - 9.08)
    assert summary.set_index("model.name").loc["Model C"]["paper test/error"] == 9.74


def test_latex_markdown_and_figure(study, tmp_path):
    out = tmp_path / "out"
    written = E.write(study, out)
    assert sorted(written) == ["summary.csv", "summary.md", "summary.pdf", "summary.png",
                               "summary.tex", "trials.csv"]
    tex = (out / "summary.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"$\pm$" in tex and r"\pm" in tex and r"n\_failed" in tex
    assert r"val/\allowbreak{}error" in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == 4  # one row per cell
    md = (out / "summary.md").read_text().splitlines()
    assert md[0].startswith("| model.name |") and len(md) == 2 + 4
    assert "±" in md[2]
    from matplotlib.image import imread

    img = imread(out / "summary.png")
    assert img.shape[0] == 520 and img.shape[1] == 680  # 3.4 x 2.6 in at 200 dpi
    assert (out / "summary.pdf").read_bytes().startswith(b"%PDF")


def test_two_exports_are_byte_identical(study, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    E.write(study, a, formats=["csv", "md", "tex"])
    E.write(study, b, formats=["csv", "md", "tex"])
    for name in ("trials.csv", "summary.csv", "summary.md", "summary.tex"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_crash_mid_export_leaves_the_previous_files(study, tmp_path, monkeypatch):
    out = tmp_path / "out"
    E.write(study, out, formats=["csv", "md", "tex"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(E, "to_latex", crash)  # after trials.csv and the md are staged
    with pytest.raises(KeyboardInterrupt):
        E.write(study, out, formats=["csv", "md", "tex"], metrics=["test/error"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_of_a_running_sweep_marks_rows(study):
    trial = study.ask()
    trial.set_user_attr("cell", "x")
    df = E.trials_frame(study)
    assert (df["state"] == "running").sum() == 1


@pytest.mark.parametrize("argv,message", [
    (["export", "nope"], "unknown study 'nope'; studies in"),
    (["export", "paper", "--select-by", "train/loss", "--over", "train.lr"],
     "--select-by train/loss: no trial has this metric"),
    (["export", "paper", "--select-by", "val/error", "--over", "train.momentum"],
     "--over train.momentum: not a swept factor"),
    (["export", "paper", "--format", "csv,docx"], "--format docx: not one of the valid values"),
])
def test_bad_export_input(study, capsys, argv, message, tmp_path):
    url = ST.default_url("paper", Path("runs"))
    before = tree(tmp_path)
    assert main([*argv, "--storage", url]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert tree(tmp_path) == before


def test_unknown_study_under_runs_lists_the_studies(study, capsys):
    assert main(["export", "nope"]) == 2
    assert "studies under runs: paper" in capsys.readouterr().err


def test_storage_with_no_studies(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/empty.db"
    optuna.storages.RDBStorage(url)
    assert main(["export", "--storage", url]) == 2
    assert "has no studies" in capsys.readouterr().err


def test_cli_export_writes_under_runs(study, capsys):
    assert main(["export", "paper", "--select-by", "val/error", "--over", "train.lr"]) == 0
    out = capsys.readouterr().out
    assert "All-CNN-C" in out and "9.08" in out
    assert Path("runs/paper/export/summary.tex").exists()
