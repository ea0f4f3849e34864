import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from ablations import export, sweep_file
from ablations.cli import main
from ablations.settings import SCHEMA
from ablations.storage import default_url
from ablations.study import open_study, stored_sweep
from tests.helpers import LRS, SEEDS, VARIANTS, make_study, tree


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_study(tmp_path)


def test_trials_frame_matches_the_study_column_by_column(study):
    df = export.trials_frame(study)
    trials = {t.number: t for t in study.get_trials()}
    assert len(df) == len(trials) == 12
    for _, row in df.iterrows():
        t = trials[row["trial"]]
        s = t.user_attrs["settings"]
        assert row["study"] == "paper"
        assert row["state"] == t.user_attrs["state"]
        for key in SCHEMA:
            want = s[key]
            assert (pd.isna(row[key]) and want is None) or row[key] == want, key
        assert row["model.name"] == s["model.name"]
        for key in export.RESULT_COLUMNS:
            want = t.user_attrs.get(key)
            assert (pd.isna(row[key]) and want is None) or row[key] == want, key
        assert row["error_message"] == t.user_attrs.get("error_message") or (
            pd.isna(row["error_message"]) and "error_message" not in t.user_attrs
        )
        assert row["datetime_start"] == t.datetime_start.isoformat()
    # ordered by the swept factors in the file's order, then seed, then trial
    keys = list(
        zip(
            df["model.variant"].map(VARIANTS.index),
            df["train.lr"].map(LRS.index),
            df["seed"],
            df["trial"],
        )
    )
    assert keys == sorted(keys)
    assert set(df["state"]) == {"complete", "diverged", "failed"}


def test_summary_means_and_stds(study):
    summary = export.build(study).summary
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


def test_seeds_that_ran_at_another_precision_are_not_pooled(study):
    """`train.precision=auto` resolves per machine: a cell whose seeds ran in 32-bit on one and
    bf16 on another is two rows, each its own mean, named by the precision that ran."""
    trials = export.trials_frame(study)
    one = (trials["model.variant"] == "base") & (trials["train.lr"] == 0.01)
    trials.loc[one & (trials["seed"] == 2), "precision"] = "bf16-mixed"
    summary, _, _ = export.summarize(trials, stored_sweep(study), ["val/error"])
    rows = summary[(summary["model.variant"] == "base") & (summary["train.lr"] == 0.01)]
    assert sorted(zip(rows["precision"], rows["n"])) == [("32-true", 2), ("bf16-mixed", 1)]
    bf16 = rows[rows["precision"] == "bf16-mixed"].iloc[0]
    assert bf16["val/error mean"] == pytest.approx(10 + 1 + 2 * 0.5)
    assert len(summary) == 5 and set(summary["precision"]) == {"32-true", "bf16-mixed"}
    # one precision throughout: no precision column, the cells as before
    assert (
        "precision"
        not in export.summarize(export.trials_frame(study), stored_sweep(study), ["val/error"])[0]
    )


def test_select_by_validation_reports_test_at_the_chosen_lr(study):
    summary = export.build(study, select_by="val/error", over=["train.lr"]).summary
    assert list(summary["model.name"]) == ["Model C", "All-CNN-C"]
    # Model C: 0.01 has the lower val error and all 3 seeds. All-CNN-C: 0.01 would win, but
    # its seed 1 failed, so it is not eligible and 0.1 (all seeds complete) is chosen.
    assert list(summary["train.lr"]) == [0.01, 0.1]
    allcnn = summary.iloc[1]
    vals = [10 + 3 + 10 + s * 0.5 for s in SEEDS]
    assert allcnn["n"] == 3 and allcnn["n_failed"] == 0
    assert allcnn["test/error mean"] == pytest.approx(statistics.mean(vals) - 1)
    assert allcnn["selected_by"] == "val/error"


def test_a_rate_whose_seeds_diverged_cannot_win_on_its_survivor(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # lr 0.1 is far better on its one surviving seed; two of its three seeds diverged
    broken = {
        (("model.variant", v), ("seed", s), ("train.lr", 0.1)): "diverged"
        for v in VARIANTS
        for s in (1, 2)
    }
    study = make_study(
        tmp_path, value=lambda c: (1 if c["train.lr"] == 0.1 else 20) + c["seed"], broken=broken
    )
    t = export.build(study, select_by="val/error", over=["train.lr"])
    assert list(t.summary["train.lr"]) == [0.01, 0.01]
    sel = t.selection.set_index(["model.variant", "train.lr"])
    assert not sel.loc[("base", 0.1), "eligible"]
    assert sel.loc[("base", 0.1), "why_not"] == "2 diverged of 3 seeds"
    assert sel.loc[("base", 0.01), "selected"]


def test_select_by_a_test_metric_is_refused(study, tmp_path, capsys):
    before = tree(tmp_path)
    assert main(["export", "paper", "--select-by", "test/error", "--over", "train.lr"]) == 2
    assert "choosing settings on the test set leaks it" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_no_paper_numbers_off_the_protocol_and_the_export_says_why(study, capsys):
    # the fixture is CIFAR-10 but standardised, with a validation split, no class-score ReLU
    # and two of the paper's four rates
    t = export.build(study, select_by="val/error", over=["train.lr"])
    assert "paper test/error" not in t.summary
    assert t.notes == [
        "paper numbers omitted: data.preprocess=standardize, "
        "data.val_size=auto, model.score_relu=False, train.lr chosen over "
        "0.1,0.01 (the paper's grid is 0.25,0.1,0.05,0.01)"
    ]
    assert main(["export", "paper"]) == 0
    out = capsys.readouterr().out
    assert "9.08" not in out and "9.74" not in out
    assert "paper numbers omitted: data.preprocess=standardize" in out
    assert "train.lr not chosen on validation" in out


PROTOCOL_FINAL = {
    "name": "final",
    "method": "grid",
    "metric": {"name": "train/loss", "goal": "minimize"},
    "parameters": {
        "data.dataset": {"value": "cifar10"},
        "data.preprocess": {"value": "gcn-zca"},
        "data.val_size": {"value": 0},
        "model.score_relu": {"value": True},
        "train.epochs": {"value": 350},
        "seed": {"values": SEEDS},
    },
    "selection": {
        "study": "paper",
        "by": "val/error",
        "over": {"train.lr": [0.25, 0.1, 0.05, 0.01]},
        "cells": [
            {"model.variant": "base", "train.lr": 0.05},
            {"model.variant": "all-cnn", "train.lr": 0.01},
        ],
    },
}


def test_paper_numbers_beside_a_final_run_on_the_protocol(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = make_study(
        tmp_path, "final", raw=PROTOCOL_FINAL, broken={}, value=lambda c: 10 + c["seed"]
    )
    t = export.build(study)
    row = t.summary.set_index("model.name")
    assert row.loc["All-CNN-C", "paper test/error"] == 9.08
    assert row.loc["Model C", "paper test/error"] == 9.74
    assert row.loc["All-CNN-C", "Δ test/error"] == pytest.approx(10 - 9.08)
    assert t.notes == []
    # the same trials with a rate chosen from two of the paper's rates would not qualify
    raw = {
        **PROTOCOL_FINAL,
        "name": "narrow",
        "selection": {**PROTOCOL_FINAL["selection"], "over": {"train.lr": [0.05, 0.01]}},
    }
    narrow = make_study(tmp_path, "narrow", raw=raw, broken={}, value=lambda c: 10)
    assert "paper test/error" not in export.build(narrow).summary


def test_final_sweep_file_retrains_the_selected_cells(study, tmp_path, capsys):
    path = tmp_path / "final.yaml"
    assert (
        main(
            [
                "export",
                "paper",
                "--select-by",
                "val/error",
                "--over",
                "train.lr",
                "--final-sweep",
                str(path),
            ]
        )
        == 0
    )
    sweep = sweep_file.load(path)
    assert sweep.base["data.val_size"] == 0 and sweep.metric == "train/loss"
    cells, invalid = sweep.cells()
    assert not invalid
    picked = {(c["model.variant"], c["train.lr"]) for c in cells}
    assert picked == {("base", 0.01), ("all-cnn", 0.1)}
    assert sorted({c["seed"] for c in cells}) == [0, 1, 2] and len(cells) == 6
    assert sweep.selection["by"] == "val/error"
    assert sweep.selection["over"] == {"train.lr": LRS}
    assert "ablate sweep" in capsys.readouterr().out


def test_effects_against_a_hand_computation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    noise = {0: 0.0, 1: 0.7, 2: -0.4}
    study = make_study(
        tmp_path,
        broken={},
        value=lambda c: (
            10
            + 2 * (c["model.variant"] == "all-cnn")
            + noise[c["seed"]] * (c["model.variant"] == "all-cnn")
            + 100 * c["train.lr"]
        ),
    )
    eff = export.build(study).effects.set_index("factor")
    from scipy import stats

    # All-CNN-C minus Model C at the same rate and seed: 2 + noise, twice (two rates)
    diffs = [2 + noise[s] for s in SEEDS] * 2
    v = eff.loc["model.variant"]
    assert v["level"] == "all-cnn" and v["reference"] == "base" and v["pairs"] == 6
    assert v["mean_diff"] == pytest.approx(statistics.mean(diffs))
    t = statistics.mean(diffs) / (statistics.stdev(diffs) / len(diffs) ** 0.5)
    p = 2 * stats.t.sf(abs(t), len(diffs) - 1)
    assert v["p_value"] == pytest.approx(p)
    # 6 pairs: Student's t interval (the bootstrap of so few only spans their range)
    half = stats.t.ppf(0.975, 5) * statistics.stdev(diffs) / len(diffs) ** 0.5
    assert v["ci_method"] == "t"
    t_mean = statistics.mean(diffs)
    assert v["ci_low"] == pytest.approx(t_mean - half)
    assert v["ci_high"] == pytest.approx(t_mean + half)
    lr = eff.loc["train.lr"]  # 0.01 against 0.1 at the same variant and seed: exactly -9
    assert lr["pairs"] == 6 and lr["mean_diff"] == pytest.approx(-9)
    assert (lr["ci_low"], lr["ci_high"]) == pytest.approx((-9, -9))
    # Holm over the two comparisons: the smaller p times 2, the larger times 1 (monotone)
    ps = sorted([v["p_value"], lr["p_value"]])
    assert sorted([v["p_holm"], lr["p_holm"]]) == pytest.approx(
        [min(1, 2 * ps[0]), max(min(1, 2 * ps[0]), ps[1])]
    )


def test_effects_with_ten_pairs_use_the_bootstrap(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seeds = list(range(5))
    raw = {
        "name": "paper",
        "method": "grid",
        "metric": {"name": "val/error", "goal": "minimize"},
        "parameters": {
            "model.variant": {"values": VARIANTS},
            "train.lr": {"values": LRS},
            "seed": {"values": seeds},
        },
    }
    noise = [0.0, 0.9, -0.3, 0.4, -0.8]
    study = make_study(
        tmp_path,
        raw=raw,
        broken={},
        value=lambda c: (
            10 + (2 + noise[c["seed"]]) * (c["model.variant"] == "all-cnn") + c["train.lr"]
        ),
    )
    v = export.build(study).effects.set_index("factor").loc["model.variant"]
    diffs = [2 + n for n in noise] * 2
    assert v["pairs"] == 10 and v["ci_method"] == "bootstrap"
    assert min(diffs) <= v["ci_low"] < v["mean_diff"] < v["ci_high"] <= max(diffs)
    assert v["mean_diff"] == pytest.approx(statistics.mean(diffs))


def test_holm_by_hand():
    import math

    from ablations.effects import holm

    got = holm([0.01, 0.04, 0.03, math.nan])
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(got[3])


def test_latex_markdown_and_figure(study, tmp_path):
    out = tmp_path / "out"
    written = export.write(study, out)
    assert set(written) == {
        "summary.csv",
        "summary.md",
        "summary.pdf",
        "summary.png",
        "summary.tex",
        "trials.csv",
        "effects.csv",
        "effects.md",
        "effects.tex",
        "effects.png",
        "effects.pdf",
        "pareto.md",
        "pareto.png",
        "pareto.pdf",
    }
    tex = (out / "summary.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"\pm" in tex and r"\label{tab:paper-summary}" in tex
    assert "Test error (\\%)" in tex and "Failed" in tex and "model.name" not in tex
    # two cells lost a seed (one diverged, one failed): the caption does not claim 3 seeds
    assert "cifar10, 350 epochs" in tex and "the completed seeds (Seeds) of 3" in tex
    assert r"$\mathbf{" in tex  # the best mean per column in bold
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == 4  # one row per cell
    md = (out / "summary.md").read_text().splitlines()
    assert md[0].startswith("| Model |") and "Test error (%)" in md[0]
    assert "±" in md[2]
    assert "class-score layer without a ReLU" in "\n".join(md)  # named in every table
    assert "class-score layer without a ReLU" in tex
    assert "test/error mean (%)" in (out / "summary.csv").read_text().splitlines()[0]
    from matplotlib.image import imread

    img = imread(out / "summary.png")
    assert img.shape[1] == 990  # 3.3 in at 300 dpi: one column of a paper
    assert (out / "summary.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.skipif(
    shutil.which("pdflatex") is None,
    reason="pdflatex is absent: apt-get install texlive-latex-recommended "
    "(.ci/run installs it as root)",
)
@pytest.mark.parametrize("select", [False, True])
def test_latex_compiles_without_an_overfull_box(study, tmp_path, select):
    out = tmp_path / "out"
    kw = {"select_by": "val/error", "over": ["train.lr"]} if select else {}
    export.write(
        study, out, formats=["tex"], metrics=["val/error", "test/error", "test/error_dropout"], **kw
    )
    doc = out / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\n"
        "\\usepackage{booktabs,graphicx,xcolor,amsmath,array}\n"
        "\\begin{document}\n\\input{summary.tex}\n\\input{effects.tex}\n"
        "\\end{document}\n"
    )
    run = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = (out / "doc.log").read_text(errors="replace")
    assert run.returncode == 0, log[-2000:]
    assert "Overfull" not in log, [ln for ln in log.splitlines() if "Overfull" in ln]


def test_two_exports_are_byte_identical(study, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    export.write(study, a, formats=["csv", "md", "tex"])
    export.write(study, b, formats=["csv", "md", "tex"])
    for name in ("trials.csv", "summary.csv", "summary.md", "summary.tex"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_crash_mid_export_leaves_the_previous_files(study, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export.write(study, out, formats=["csv", "md", "tex"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(export, "to_latex", crash)  # after trials.csv and the md are staged
    with pytest.raises(KeyboardInterrupt):
        export.write(study, out, formats=["csv", "md", "tex"], metrics=["test/error"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_of_a_running_sweep_marks_rows(study):
    trial = study.ask()
    trial.set_user_attr("cell", "x")
    df = export.trials_frame(study)
    assert (df["state"] == "running").sum() == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["export", "nope"], "unknown study 'nope'; studies in"),
        (
            ["export", "paper", "--select-by", "train/loss", "--over", "train.lr"],
            "--select-by train/loss: no trial has this metric",
        ),
        (
            ["export", "paper", "--select-by", "val/error", "--over", "train.momentum"],
            "--over train.momentum: not a swept factor",
        ),
        (["export", "paper", "--format", "csv,docx"], "--format 'csv,docx': give one or more of"),
        (["export", "paper", "--format", ""], "--format '': give one or more of"),
        (["export", "paper", "--over", "train.lr"], "--over needs --select-by"),
        (
            ["export", "paper", "--select-by", "val/loss", "--over", "train.lr"],
            "--select-by val/loss: no trial has this metric",
        ),
        (["export", "paper", "--final-sweep", "f.yaml"], "--final-sweep needs --select-by"),
    ],
)
def test_bad_export_input(study, capsys, argv, message, tmp_path):
    url = default_url("paper", Path("runs"))
    before = tree(tmp_path)
    assert main([*argv, "--storage", url]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert tree(tmp_path) == before


def test_unknown_study_under_runs_lists_the_studies(study, capsys):
    assert main(["export", "nope"]) == 2
    assert "studies under runs: paper" in capsys.readouterr().err


def test_a_study_with_no_trials(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = {
        "name": "empty",
        "method": "grid",
        "parameters": {"model.variant": {"values": VARIANTS}, "seed": {"values": SEEDS}},
    }
    (tmp_path / "empty.yaml").write_text(yaml.safe_dump(raw))
    sweep = sweep_file.load(tmp_path / "empty.yaml")
    open_study(sweep, default_url("empty", Path("runs")), "empty", create=True)
    before = tree(tmp_path)
    assert main(["export", "empty"]) == 2
    assert "study empty has no trials yet" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_storage_with_no_studies(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/empty.db"
    optuna.storages.RDBStorage(url)
    assert main(["export", "--storage", url]) == 2
    assert "has no studies" in capsys.readouterr().err


def test_cli_export_writes_under_runs(study, capsys):
    assert main(["export", "paper", "--select-by", "val/error", "--over", "train.lr"]) == 0
    out = capsys.readouterr().out
    assert "All-CNN-C" in out and "paper numbers omitted" in out
    for name in ("summary.tex", "effects.tex", "effects.pdf", "selection.csv"):
        assert Path(f"runs/paper/export/{name}").exists(), name


def test_the_ablation_table_run_keeps_tables_and_figures_apart(study, tmp_path):
    """W&B's own reader shows the closing run with its three tables, two figures and the
    report. In a process of its own, as the launcher makes it: W&B keeps per-process state
    that a later in-process run of another test would inherit."""
    code = (
        "import optuna; from pathlib import Path; "
        "from ablations.launcher import closing_outputs; "
        "from ablations.storage import default_url, open_storage; "
        "from ablations.study import stored_sweep; "
        "s = optuna.load_study(study_name='paper', storage=open_storage("
        "default_url('paper', Path('runs')))); "
        "closing_outputs(s, stored_sweep(s), 'offline', Path('runs/paper'))"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "WANDB_MODE": "offline"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = Path("runs/paper/wandb").glob("offline-run-*")
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run(
        [str(wandb), "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip(), (out.stdout[-1000:], out.stderr[-2000:])
    doc = json.loads(out.stdout)
    assert doc["name"] == "paper-ablation-table"
    summary = doc["summary"]
    for key in ("summary", "effects", "trials"):
        assert summary[key]["_type"] == "table-file", key
    assert summary["effects"]["nrows"] == 2  # variant and lr
    for key in ("summary_figure", "effects_figure"):
        assert summary[key]["_type"] == "image-file", key
    # the report: shown in the run, and kept whole as its artifact
    assert summary["report"]["_type"] == "html-file"
    assert Path("runs/paper/report.html").stat().st_size > 1_000_000
    records = subprocess.run(
        [str(wandb), "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    (kept,) = [
        r["artifact"]
        for r in map(json.loads, filter(lambda x: x.startswith("{"), records.splitlines()))
        if r["type"] == "artifact" and r["artifact"]["type"] == "report"
    ]
    assert kept["name"] == "paper-report"
    (content,) = kept["manifest"]["contents"]
    assert content["path"] == "report.html"
    assert int(content["size"]) == Path("runs/paper/report.html").stat().st_size
