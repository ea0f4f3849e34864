import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml

from ablations import provenance, report, sweep_file, worker
from ablations.cli import main
from ablations.storage import default_url
from ablations.study import DEFINITION_ATTR, DONE_STATES, open_study, trial_state
from ablations.trial import StatusFile
from lightning_modules.precision import resolve_precision
from tests.helpers import FAST, load, run_worker, sweep_cli, tree, write_sweep


def complete_cells(study):
    return sorted(t.user_attrs["cell"] for t in study.get_trials() if trial_state(t) in DONE_STATES)


# --- the file --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"parameters": {"train.lrr": {"value": 0.1}}}, "did you mean 'train.lr'"),
        ({"parameters": {"model.head": {"values": ["gap", "mlp"]}}}, "valid values: gap, fc"),
        ({"parameters": {"train.epochs": {"value": "two"}}}, "wrong type: expected int"),
        ({"parameters": {"seed": {"values": []}}}, "seed.values is empty"),
        ({"parameters": {"train.lr": {"min": 0.01, "max": 0.1}}}, "method=grid needs 'values'"),
        ({"parameters": {"model.pooling": {"value": "max"}}}, "do not also set model.pooling"),
        ({"method": "evolution"}, "valid values: grid, random, bayes"),
        ({"metric": {"name": "accuracy"}}, "metric.name='accuracy'"),
        ({"early_terminate": {"type": "asha"}}, "valid values: hyperband"),
        ({"method": "random"}, "needs run_cap"),
        ({"parameters": {"train.lr": {"values": [0.1], "min": 0}}}, "cannot be combined with min"),
        (
            {"parameters": {"train.lr": {"values": [0.1], "distribution": "uniform"}}},
            "'values' goes with distribution categorical",
        ),
        ({"parameters": {"data.val_size": {"value": 0}}}, "holds out no validation images"),
        ({"selection": {"cells": []}}, "selection.cells: expected a non-empty list"),
        (
            {"selection": {"cells": [{"model.variant": "base"}]}},
            "selection.cells sets model.variant, which parameters sets too",
        ),
        (
            {"selection": {"cells": [{"train.lr": 0.1}, {"train.momentum": 0.5}]}},
            "every cell must set",
        ),
    ],
)
def test_bad_sweep_files_exit_2_and_write_nothing(tmp_path, in_tmp, capsys, change, message):
    file = write_sweep(tmp_path / "s.yaml", **change)
    before = tree(in_tmp)
    assert main(["sweep", str(file), "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert tree(in_tmp) == before  # no storage, no runs/


def test_invalid_grid_cells_are_listed_and_skipped(tmp_path, in_tmp, capsys):
    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={
            "model.variant": None,
            "model.pooling": {"values": ["max", "none"]},
            "model.strided_conv": {"values": ["fold", "extra"]},
        },
    )
    raw = yaml.safe_load(file.read_text())
    del raw["parameters"]["model.variant"]
    file.write_text(yaml.safe_dump(raw))
    sweep = sweep_file.load(file)
    valid, invalid = sweep.cells()
    assert len(valid) == 3 and len(invalid) == 1
    assert invalid[0][0] == {"model.pooling": "max", "model.strided_conv": "fold"}
    assert main(["sweep", str(file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 cells to run, 1 invalid skipped, 3 epochs in all" in out
    assert "halve the resolution twice" in out
    assert not Path("runs").exists()  # a dry run writes nothing


def test_reused_name_with_another_definition_is_refused(tmp_path, in_tmp, capsys):
    run_worker(write_sweep(tmp_path / "a.yaml"))
    journal = Path("runs/t/optuna.journal")
    size = journal.stat().st_size
    other = write_sweep(tmp_path / "b.yaml", parameters={"seed": {"values": [0, 1]}})
    assert main(["sweep", str(other), "--wandb", "disabled"]) == 2
    assert "different sweep definition (differs in: parameters)" in capsys.readouterr().err
    assert journal.stat().st_size == size
    # a fixed value that no trial ran with is a different sweep too
    other = write_sweep(tmp_path / "c.yaml", parameters={"train.lr": {"value": 0.05}})
    assert main(["sweep", str(other), "--wandb", "disabled"]) == 2
    assert journal.stat().st_size == size


def test_a_default_written_out_in_the_file_is_the_same_sweep(tmp_path, in_tmp, capsys):
    """A file that now writes out the value every trial ran with (a default that has since
    changed, say) resumes its study: nothing is re-run, and the study stores the file as
    written."""
    run_worker(write_sweep(tmp_path / "a.yaml"))
    written = write_sweep(tmp_path / "b.yaml", parameters={"train.lr": {"value": 0.01}})
    assert main(["sweep", str(written), "--wandb", "disabled"]) == 0
    assert "nothing left to run" in capsys.readouterr().out
    study = load()
    assert [trial_state(t) for t in study.get_trials()] == ["complete", "complete"]
    stored = study.user_attrs[DEFINITION_ATTR]["parameters"]
    assert stored["train.lr"] == {"value": 0.01}


def test_unreachable_storage_is_named(tmp_path, in_tmp, capsys):
    file = write_sweep(tmp_path / "s.yaml")
    url = "postgresql://nobody@127.0.0.1:9/nodb"
    assert main(["sweep", str(file), "--storage", url, "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err
    assert "host 127.0.0.1, port 9, database nodb" in err
    assert not Path("runs").exists()


# --- running ---------------------------------------------------------------------------------


def test_two_workers_complete_every_cell_once_and_a_rerun_adds_nothing(tmp_path, in_tmp):
    file = write_sweep(tmp_path / "s.yaml", parameters={"seed": {"values": [0, 1]}})
    cmd = sweep_cli(file, workers=2)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    study = load()
    cells = complete_cells(study)
    assert len(cells) == 4 and len(set(cells)) == 4
    assert len(study.get_trials()) == 4
    # the run is recorded with the study, and its closing report has each trial's curves
    (launch,) = provenance.launches(study)
    assert launch["argv"][:2] == ["ablate", "sweep"] and launch["exit_code"] == 0
    assert launch["versions"]["torch"] == "2.14.1" and launch["ended"] >= launch["started"]
    assert launch["sweep_file"] == Path("runs/t/sweep.yaml").read_text()
    curves = report.histories(study)
    assert {source for _, source in curves.values()} == {"study"} and len(curves) == 4
    for t in study.get_trials():
        assert len(curves[t.number][0]) == t.user_attrs["epochs_run"]
    assert Path("runs/t/report.html").stat().st_size > 1_000_000
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing left to run" in again.stdout
    assert len(load().get_trials()) == 4
    assert len(provenance.launches(load())) == 1  # a run that starts no worker records none


def test_diverged_trial_is_recorded_not_retried_and_the_sweep_goes_on(tmp_path, in_tmp):
    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={
            "model.variant": {"value": "all-cnn"},
            "model.dropout": {"value": "none"},
            "train.lr": {"values": [1e12, 0.01]},
        },
    )
    run_worker(file)
    trials = load().get_trials()
    states = {t.params["train.lr"]: trial_state(t) for t in trials}
    assert states == {1e12: "diverged", 0.01: "complete"}
    assert (
        "non-finite"
        in next(t for t in trials if t.params["train.lr"] == 1e12).user_attrs["error_message"]
    )
    run_worker(file)  # resume: the diverged cell is a result, not retried
    assert len(load().get_trials()) == 2


def test_wandb_offline_run_files(tmp_path, in_tmp):
    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={"model.variant": {"value": "all-cnn"}, "seed": {"values": [3, 4]}},
    )
    run_worker(file, wandb="offline", limit=1)
    trial = load().get_trials()[0]
    run_dirs = list(Path("runs/t/trials").glob("*/wandb/offline-run-*"))
    assert len(run_dirs) == 1
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run(
        [str(wandb), "leet", "inspect", "--json", str(run_dirs[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["run_group"] == "t" and run["job_type"] == "All-CNN-C"
    assert run["display_name"] == "All-CNN-C-s3-t0"
    assert "seed=3" in run["tags"]
    config = run["config"]["update"]
    for key in (
        "model.base",
        "model.pooling",
        "train.lr",
        "data.dataset",
        "seed",
        "study",
        "trial",
    ):
        assert key in config, key
    assert any(r["type"] == "history" for r in records)  # per-epoch metrics
    summary = json.loads(
        subprocess.run(
            [str(wandb), "leet", "inspect", "--summary", "--json", str(run_dirs[0])],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )["summary"]
    assert summary["test/error"] == pytest.approx(trial.user_attrs["test/error"])
    assert summary["state"] == "complete"
    assert trial.user_attrs["wandb_run_id"] == run["run_id"]


def test_a_wandb_failure_never_fails_a_trial(tmp_path, in_tmp, monkeypatch):
    from ablations.wandb_logger import SafeWandbLogger

    def broken(*a, **k):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(SafeWandbLogger, "__init__", broken)
    run_worker(
        write_sweep(tmp_path / "s.yaml", parameters={"model.variant": {"value": "all-cnn"}}),
        wandb="offline",
    )
    assert [trial_state(t) for t in load().get_trials()] == ["complete"]


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_respect_run_cap(tmp_path, in_tmp, method):
    file = write_sweep(
        tmp_path / "s.yaml",
        method=method,
        run_cap=3,
        parameters={
            "model.variant": {"value": "all-cnn"},
            "train.lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.05},
        },
    )
    run_worker(file)
    trials = load().get_trials()
    assert len(trials) == 3
    assert all(0.001 <= t.params["train.lr"] <= 0.05 for t in trials)
    run_worker(file)
    assert len(load().get_trials()) == 3


def test_hyperband_prunes_a_clearly_worse_curve(tmp_path, in_tmp):
    file = write_sweep(
        tmp_path / "s.yaml",
        method="random",
        run_cap=40,
        early_terminate={"type": "hyperband", "min_iter": 1, "max_iter": 4, "eta": 2},
        parameters={
            "model.variant": {"value": "all-cnn"},
            "train.epochs": {"value": 4},
            "train.lr": {"values": [1e-9]},
        },
    )
    sweep = sweep_file.load(file)
    study = open_study(sweep, default_url("t", Path("runs")), "t", create=True)
    # good trials already in the study: low validation error at every epoch
    dist = {"train.lr": optuna.distributions.CategoricalDistribution([1e-9])}
    for i in range(30):
        study.add_trial(
            optuna.trial.create_trial(
                params={"train.lr": 1e-9},
                distributions=dist,
                value=5.0 + i * 0.01,
                intermediate_values={e: 5.0 + i * 0.01 for e in range(4)},
                # what successive halving records as a trial passes each rung
                system_attrs={f"completed_rung_{r}": 5.0 + i * 0.01 for r in range(3)},
                user_attrs={"state": "complete"},
            )
        )
    url = default_url("t", Path("runs"))
    argv = [
        str(file),
        "--study",
        "t",
        "--storage",
        url,
        "--runs-dir",
        "runs/t",
        "--wandb",
        "disabled",
        "--limit",
        "33",
    ]
    assert worker.main(argv) == 0
    ours = [t for t in load().get_trials() if "worker.pid" in t.user_attrs]
    # Hyperband's last bracket only judges at max_iter, so not every trial can be pruned;
    # trials at chance level in the other brackets must be, before their last epoch
    pruned = [t for t in ours if trial_state(t) == "pruned"]
    assert pruned, [(t.number, trial_state(t), t.intermediate_values) for t in ours]
    assert all(t.user_attrs["epochs_run"] < 4 for t in pruned)


def test_status_prints_totals_and_cells(tmp_path, in_tmp, capsys):
    run_worker(write_sweep(tmp_path / "s.yaml"))
    assert main(["status", "t"]) == 0
    out = capsys.readouterr().out
    assert "t: 2 done, 0 running, 0 failed trials, 0 left, 0 given up (of 2 cells)" in out
    assert "complete" in out
    assert main(["status", "nope"]) == 2


def test_worker_status_line_is_written_by_rank_zero_only(tmp_path):
    """Under DDP every rank runs the callbacks: only rank 0 writes the worker's live line."""
    path = tmp_path / "worker-0.json"
    status = StatusFile(path, worker=0)
    metrics = {"val/error": torch.tensor(12.345)}
    status.on_train_epoch_end(
        SimpleNamespace(is_global_zero=False, current_epoch=0, callback_metrics=metrics), None
    )
    assert not path.exists()
    status.on_train_epoch_end(
        SimpleNamespace(is_global_zero=True, current_epoch=0, callback_metrics=metrics), None
    )
    info = json.loads(path.read_text())
    assert (info["worker"], info["epoch"], info["val_error"]) == (0, 1, 12.35)
    assert [p.name for p in tmp_path.iterdir()] == ["worker-0.json"]  # no temporary left


def test_a_final_sweep_without_validation_images_completes_and_exports(tmp_path, in_tmp):
    """The final protocol: selected cells retrained on every training image (no val split)."""
    params = {**FAST, "data.val_size": {"value": 0}, "seed": {"values": [0, 1]}}
    raw = {
        "name": "t",
        "method": "grid",
        "metric": {"name": "train/loss", "goal": "minimize"},
        "parameters": params,
        "selection": {
            "study": "sel",
            "by": "val/error",
            "over": {"train.lr": [0.1, 0.01]},
            "cells": [
                {"model.variant": "base", "train.lr": 0.01},
                {"model.variant": "all-cnn", "train.lr": 0.1},
            ],
        },
    }
    file = tmp_path / "final.yaml"
    file.write_text(yaml.safe_dump(raw))
    run_worker(file)
    trials = load().get_trials()
    assert [t.user_attrs["state"] for t in trials] == ["complete"] * 4
    got = sorted(
        (t.params["model.variant"], t.params["train.lr"], t.params["seed"]) for t in trials
    )
    assert got == [("all-cnn", 0.1, 0), ("all-cnn", 0.1, 1), ("base", 0.01, 0), ("base", 0.01, 1)]
    assert all("val/error" not in t.user_attrs for t in trials)
    assert all(t.user_attrs["test/error"] >= 0 for t in trials)
    # auto, on this CPU: bf16 mixed where it computes bf16 natively
    assert {t.user_attrs["precision"] for t in trials} == {resolve_precision("auto", "cpu")}
    assert main(["export", "t", "--format", "csv"]) == 0
    summary = (Path("runs/t/export/summary.csv")).read_text().splitlines()
    assert len(summary) == 3  # header and two selected cells


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].glob("sweeps/*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_sweep_file_is_valid(path):
    sweep = sweep_file.load(path)
    assert sweep.name == path.stem
    if sweep.method == "grid":
        cells, _ = sweep.cells()
        assert cells
