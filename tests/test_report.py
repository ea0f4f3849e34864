"""`ablate report`: one HTML file that a real browser (Debian's headless Chromium, network
off) opens with every figure drawn, no request out and no console error; its numbers are the
export's; its curves are each seed's and their mean; bad input writes nothing."""

import io
import json
import os
import re
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from ablations import export, report, sweep_file
from ablations.cli import main
from ablations.export.tables import display_table, effects_table
from ablations.report import charts
from ablations.report.page import PLOTLY_JS
from ablations.storage import default_url
from ablations.study import open_study
from tests.browser import chromium, visit
from tests.helpers import LRS, make_study, tree

needs_chromium = pytest.mark.skipif(
    chromium() is None,
    reason="Debian's chromium is not installed (`make test-deps` installs it as root)",
)


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_study(tmp_path, curves=True)


def page_of(study) -> str:
    assert main(["report", study.study_name]) == 0
    return Path(f"runs/{study.study_name}/report.html").read_text()


# --- in the browser --------------------------------------------------------------------------


@needs_chromium
def test_the_report_opens_offline_with_every_figure_drawn_and_no_error(study, tmp_path):
    from PIL import Image

    page_of(study)
    seen = visit(tmp_path / "runs/paper/report.html")
    assert seen.errors == [] and seen.remote == []
    assert seen.requests == [(tmp_path / "runs/paper/report.html").as_uri()]
    # summary, effects, error against MACs, one learning-curve figure per model, the factors
    assert seen.figures == 6 and seen.drawn == 6
    shown, _ = display_table(export.build(study).summary, ["val/error", "test/error"])
    for cell in [*shown["Val. error (%)"], *shown["Test error (%)"]]:
        assert cell in seen.text, cell
    assert "10.50 ± 0.50" in seen.text  # Model C at lr 0.01: test errors 10, 10.5, 11
    assert "RuntimeError: boom" in seen.text  # the failed trial's message, in its row
    image = np.asarray(Image.open(io.BytesIO(seen.screenshot)).convert("RGB"))
    assert image.shape == (1600, 1280, 3)
    inked = (image < 200).any(axis=2).mean()
    assert inked > 0.02, f"{inked:.4f} of the screenshot is not near-white: blank"
    # the summary figure's mean markers (#1f77b4) are on the first screen
    blue = (np.abs(image.astype(int) - [31, 119, 180]).sum(axis=2) < 30).sum()
    assert blue > 200, blue


@needs_chromium
def test_the_browser_check_sees_a_request_out_and_a_script_error(tmp_path):
    """The checks above can fail: a page that asks the network and throws is caught."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<html><body><p>x</p><img src="http://example.invalid/a.png">'
        '<script>throw new Error("boom")</script></body></html>'
    )
    seen = visit(page)
    assert seen.remote == ["http://example.invalid/a.png"]
    assert any("boom" in e for e in seen.errors), seen.errors
    assert any("load failed" in e for e in seen.errors), seen.errors


SORT_AND_FILTER = """(() => {
  const table = document.getElementById("trials-table");
  const heads = Array.from(table.tHead.rows[0].cells).map(c => c.textContent);
  const column = name => Array.from(table.tBodies[0].rows)
    .filter(r => !r.hidden).map(r => r.cells[heads.indexOf(name)].textContent);
  table.tHead.rows[0].cells[heads.indexOf("Test error (%)")].click();
  const ascending = column("Trial");
  table.tHead.rows[0].cells[heads.indexOf("Test error (%)")].click();
  const descending = column("Trial");
  const words = document.getElementById("trials-filter");
  words.value = "all-cnn 0.1";
  words.dispatchEvent(new Event("input"));
  const filtered = column("Trial");
  const counted = document.getElementById("trials-count").textContent;
  words.value = "";
  words.dispatchEvent(new Event("input"));
  const state = document.getElementById("trials-state");
  state.value = "failed";
  state.dispatchEvent(new Event("change"));
  return {ascending, descending, filtered, counted, failed: column("Trial")};
})()"""


@needs_chromium
def test_the_trials_table_sorts_and_filters_in_the_page(study, tmp_path):
    page_of(study)
    seen = visit(tmp_path / "runs/paper/report.html", script=SORT_AND_FILTER)
    assert seen.errors == []
    trials = export.trials_frame(study)
    done = trials[trials["test/error"].notna()]
    by_error = done.sort_values(["test/error", "trial"], kind="stable")
    missing = [str(n) for n in trials.loc[trials["test/error"].isna(), "trial"]]
    got = seen.result
    # sorted by the number, ties in any order; the trials without one last, either way
    errors = dict(zip(done["trial"].astype(str), done["test/error"]))
    assert [errors[n] for n in got["ascending"][: len(done)]] == list(by_error["test/error"])
    assert sorted(got["ascending"][len(done) :]) == sorted(missing)
    assert [errors[n] for n in got["descending"][: len(done)]] == sorted(
        by_error["test/error"], reverse=True
    )
    picked = trials[(trials["model.variant"] == "all-cnn") & (trials["train.lr"] == 0.1)]
    assert sorted(got["filtered"]) == sorted(str(n) for n in picked["trial"])
    assert got["counted"] == f"{len(picked)} of {len(trials)} trials shown"
    assert got["failed"] == [str(n) for n in trials.loc[trials["state"] == "failed", "trial"]]


# --- what the page holds ---------------------------------------------------------------------


def test_the_report_holds_the_export_s_tables_and_every_trial(study):
    text = page_of(study)
    t = export.build(study)
    shown, best = display_table(t.summary, t.metrics, t.sweep.swept)
    for i, row in shown.iterrows():
        for col in shown.columns:
            cell = f"<b>{row[col]}</b>" if (i, col) in best else str(row[col])
            assert f"<td>{cell}</td>" in text, (col, cell)
    for _, row in effects_table(t.effects).iterrows():
        assert "".join(f"<td>{v}</td>" for v in row.astype(str)) in text
    states = re.findall(r'<tr class="(\w+)" data-state="\w+">', text)
    assert sorted(states) == sorted(t.trials["state"])  # one row per trial
    assert states.count("failed") == 1 and states.count("diverged") == 1


def test_the_report_needs_nothing_from_the_network(study):
    text = page_of(study)
    library = PLOTLY_JS.read_text()  # inlined whole (its own strings name its web site)
    assert library in text and "plotly.js (cartesian - minified) v4.1.1" in library
    ours = text.replace(library, "")
    assert re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", ours) is None
    assert "<script src" not in ours and "<link" not in ours
    assert "default-src 'none'" in ours  # and the browser is told to refuse any request
    assert len(text.encode()) < 3_000_000


def test_learning_curves_are_each_seed_and_the_completed_seeds_mean():
    trials = pd.DataFrame(
        {"trial": [0, 1, 2], "seed": [0, 1, 2], "state": ["complete", "complete", "failed"]}
    )
    hist = {
        0: [{"epoch": 0, "val/error": 30.0, "train/loss": 2.0}, {"epoch": 1, "val/error": 20.0}],
        1: [{"epoch": 0, "val/error": 34.0, "train/loss": 1.0}, {"epoch": 1, "val/error": 24.0}],
        2: [{"epoch": 0, "val/error": 90.0}],
    }
    spec = charts.learning_curves([("C", trials)], hist)
    val = [d for d in spec["data"] if d.get("xaxis") == "x2"]
    seeds = [d for d in val if d["line"]["width"] == 1]
    assert [d["y"] for d in seeds] == [[30.0, 20.0], [34.0, 24.0], [90.0]]
    assert seeds[2]["line"]["dash"] == "dot"  # the failed seed: drawn, not averaged
    (mean,) = [d for d in val if d["name"].startswith("C (mean")]
    assert mean["x"] == [1, 2] and mean["y"] == [32.0, 22.0]
    (band,) = [d for d in val if d.get("fill") == "toself"]
    sd = statistics.stdev([30.0, 34.0])
    assert band["y"] == pytest.approx([32 + sd, 22 + sd, 22 - sd, 32 - sd])
    loss = [d for d in spec["data"] if d.get("xaxis") == "x"]
    assert [d["y"] for d in loss if d["name"].startswith("C (mean")] == [[1.5]]


def test_curves_come_from_the_study_else_the_run_folder_else_intermediate_values(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    raw = {"name": "old", "method": "grid", "parameters": {"seed": {"values": [0, 1, 2, 3]}}}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    sweep = sweep_file.load(tmp_path / "old.yaml")
    study = open_study(sweep, default_url("old", Path("runs")), "old", create=True)
    folder = tmp_path / "elsewhere" / "0001-C"  # moved: found under the study's trials/
    (tmp_path / "runs/old/trials/0001-C").mkdir(parents=True)
    (tmp_path / "runs/old/trials/0001-C/epochs.json").write_text(
        json.dumps({"history": [{"epoch": 0, "val/error": 50.0, "train/loss": 1.5}]})
    )
    dist = {"seed": CategoricalDistribution([0, 1, 2, 3])}
    mine = {"run_dir": str(folder), "epochs_run": 1, "val/error": 50.0}
    # another run's folder under the same name (a relative run_dir read on another machine)
    other = {"run_dir": str(folder), "epochs_run": 1, "val/error": 12.0}
    for seed, attrs, steps in [
        (0, {"curves": {"epoch": [0], "val/error": [40.0]}}, {}),
        (1, mine, {0: 99.0}),
        (2, {}, {0: 60.0, 1: 55.0}),
        (3, other, {0: 70.0}),
    ]:
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE, value=1.0, params={"seed": seed},
                distributions=dist, user_attrs=attrs, intermediate_values=steps,
            )
        )  # fmt: skip
    got = report.histories(study, tmp_path / "runs/old")
    assert got[0] == ([{"epoch": 0, "val/error": 40.0}], "study")
    assert got[1] == ([{"epoch": 0, "val/error": 50.0, "train/loss": 1.5}], "run folder")
    steps = [{"epoch": 0, "val/error": 60.0}, {"epoch": 1, "val/error": 55.0}]
    assert got[2] == (steps, "intermediate")
    assert got[3] == ([{"epoch": 0, "val/error": 70.0}], "intermediate")


def test_provenance_names_each_launch_or_says_it_was_not_recorded(study):
    text = page_of(study)
    assert "No run of `ablate sweep` is recorded in this study" in text
    assert "name: paper" in text and "train.lr" in text  # the stored definition, as YAML
    study.set_user_attr(
        "launch:h1:7:100",
        {
            "argv": ["ablate", "sweep", "paper.yaml", "--workers", "2"],
            "host": "h1",
            "started": "2026-01-01T00:00:00+00:00",
            "ended": "2026-01-01T01:00:00+00:00",
            "exit_code": 0,
            "git_commit": "abc123-dirty",
            "versions": {"python": "3.11.2", "torch": "2.14.1", "optuna": "5.0.0"},
            "sweep_file": "# paper.yaml as read\nname: paper\n",
        },
    )
    text = page_of(study)
    assert "ablate sweep paper.yaml --workers 2" in text and "abc123-dirty" in text
    assert "<td>2.14.1</td>" in text and "# paper.yaml as read" in text
    assert "No run of `ablate sweep`" not in text


# --- bad input: one line, exit 2, nothing written --------------------------------------------


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_an_unknown_study_writes_nothing(study, tmp_path, capsys):
    before = tree(tmp_path)
    assert main(["report", "nope"]) == 2
    assert "no study 'nope' under runs; studies under runs: paper" in one_error_line(capsys)
    assert tree(tmp_path) == before


def test_a_study_with_no_finished_trials_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    raw = {"name": "early", "method": "grid", "parameters": {"seed": {"values": [0, 1]}}}
    (tmp_path / "early.yaml").write_text(yaml.safe_dump(raw))
    sweep = sweep_file.load(tmp_path / "early.yaml")
    study = open_study(sweep, default_url("early", Path("runs")), "early", create=True)
    study.ask({"seed": CategoricalDistribution([0, 1])})  # running
    study.add_trial(
        create_trial(
            state=TrialState.FAIL, params={"seed": 1},
            distributions={"seed": CategoricalDistribution([0, 1])},
            user_attrs={"state": "interrupted"},
        )
    )  # fmt: skip
    journal = Path("runs/early/optuna.journal").read_bytes()
    before = tree(tmp_path)
    assert main(["report", "early"]) == 2
    line = one_error_line(capsys)
    assert "study early has no finished trials yet (1 running, 1 interrupted)" in line
    assert tree(tmp_path) == before
    assert Path("runs/early/optuna.journal").read_bytes() == journal


def test_out_under_a_file_writes_nothing(study, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep")
    before = tree(tmp_path)
    assert main(["report", "paper", "--out", "afile/report.html"]) == 2
    assert "is under afile, which is a file" in one_error_line(capsys)
    assert tree(tmp_path) == before and (tmp_path / "afile").read_text() == "keep"


def test_out_names_the_file_or_a_folder_for_it(study, tmp_path, capsys):
    assert main(["report", "paper", "--out", "deep/new/p.html"]) == 0
    assert (tmp_path / "deep/new/p.html").read_text().startswith("<!DOCTYPE html>")
    (tmp_path / "folder").mkdir()
    assert main(["report", "paper", "--out", "folder"]) == 0
    assert (tmp_path / "folder/report.html").exists()
    assert not list(tmp_path.glob("**/.*.tmp"))  # written whole, no temporary left
    umask = os.umask(0)
    os.umask(umask)
    mode = (tmp_path / "folder/report.html").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask  # as any file a user writes: others may read it
    assert "MB): open it in any browser" in capsys.readouterr().out


def test_a_selection_is_shown_with_every_candidate(study):
    assert main(["report", "paper", "--select-by", "val/error", "--over", "train.lr"]) == 0
    text = Path("runs/paper/report.html").read_text()
    selection = export.build(study, select_by="val/error", over=["train.lr"]).selection
    part = text[text.index('<section id="selection">') : text.index('<section id="curves">')]
    assert part.count("<tr>") == len(selection) + 1  # its header and one row per candidate
    assert "the lowest mean val/error among settings whose seeds all completed" in part


def test_the_factors_figure_has_every_completed_trial_and_each_level_s_mean(study):
    t = export.build(study)
    spec = charts.factor_slices(t.trials, t.sweep, "val/error")
    done = t.trials[t.trials["state"] == "complete"]
    for axis, key in (("x", "model.variant"), ("x2", "train.lr")):
        points = [d for d in spec["data"] if d["xaxis"] == axis and d["name"] != "level mean"]
        assert sum(len(d["y"]) for d in points) == len(done)
        (means,) = [d for d in spec["data"] if d["xaxis"] == axis and d["name"] == "level mean"]
        want = done.groupby(done[key].map(str))["val/error"].mean()
        assert dict(zip(means["x"], means["y"])) == pytest.approx(want.to_dict())
    assert spec["layout"]["xaxis2"]["categoryarray"] == [str(v) for v in LRS]  # the file's order


def test_the_optimisation_history_draws_the_best_so_far():
    trials = pd.DataFrame(
        {
            "trial": [0, 1, 2, 3],
            "state": ["complete", "failed", "complete", "complete"],
            "model.name": ["C"] * 4,
            "train.lr": [0.1, 0.2, 0.05, 0.3],
            "val/error": [20.0, None, 12.0, 15.0],
        }
    )
    sweep = sweep_file.parse(
        {
            "name": "r",
            "method": "random",
            "run_cap": 4,
            "parameters": {"train.lr": {"distribution": "uniform", "min": 0.01, "max": 0.5}},
        }
    )
    spec = charts.optimisation_history(trials, sweep)
    points, best = spec["data"]
    assert points["x"] == [0, 2, 3] and points["y"] == [20.0, 12.0, 15.0]
    assert best["y"] == [20.0, 12.0, 12.0]
