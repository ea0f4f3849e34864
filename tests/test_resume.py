"""A trial interrupted anywhere continues from its last epoch checkpoint and ends with the
numbers it would have had uninterrupted: the same weights, bit for bit, and the same errors.
Through real processes and signals: a killed worker, a taken-over lease, a stopped sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState

from ablations import checkpoints, run
from ablations.record import TrialRecord
from ablations.resume import LAST, CheckpointPolicy, ResumeError, epoch_checkpoints
from ablations.settings import resolve
from ablations.storage import default_url, open_storage
from ablations.study import trial_state
from tests.helpers import FAST, sweep_cli, wait_until, write_sweep

# dropout on (All-CNN-C's paper dropout), so the restored random stream is what is tested
SETTINGS = {
    "data.dataset": "synthetic",
    "data.subset": 256,
    "data.val_size": 64,
    "data.preprocess": "standardize",
    "model.width": 0.125,
    "model.variant": "all-cnn",
    "model.dropout": "paper",
    "model.norm": "batch",  # so that it learns at this size (tests/test_training.py)
    "train.epochs": 3,
}


class Interrupt(Exception):
    pass


class InterruptAt(Callback):
    """Raises at one moment of the fit or test, as a signal or a dead machine would end it."""

    def __init__(self, hook: str, epoch: int) -> None:
        self.hook, self.epoch = hook, epoch

    def _at(self, hook: str, trainer) -> None:
        if hook == self.hook and (trainer.current_epoch == self.epoch or hook == "test"):
            raise Interrupt(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            self._at("mid-epoch", trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._at("between epochs", trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.state.fn == "fit":
            self._at("validation", trainer)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._at("test", trainer)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / LAST, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "run"
    torch.set_num_threads(1)
    return run.train(resolve(SETTINGS), path, progress=False), weights(path)


def interrupted_then_resumed(path: Path, hook: str, epoch: int) -> TrialRecord:
    settings = resolve(SETTINGS)
    with pytest.raises(Interrupt):
        run.train(settings, path, progress=False, callbacks=[InterruptAt(hook, epoch)])
    prepared = run.prepare(settings)
    found = checkpoints.find(path, prepared.flat, prepared.module)
    assert found is not None
    return run.train(settings, path, progress=False, prepared=prepared, resume=found)


@pytest.mark.parametrize(
    "hook,epoch,resumed_from",
    [("mid-epoch", 1, 1), ("between epochs", 2, 2), ("validation", 2, 2), ("test", 0, 3)],
)
def test_a_resumed_run_ends_with_the_same_weights_and_errors(
    tmp_path, uninterrupted, hook, epoch, resumed_from
):
    ref, ref_weights = uninterrupted
    torch.set_num_threads(1)
    got = interrupted_then_resumed(tmp_path / "run", hook, epoch)
    assert got.outcome == "complete"
    assert got.timings.segments == 2 and got.timings.resumed_from_epoch == resumed_from
    assert got.metrics.epochs_run == 3 and len(got.history) == 3
    for key in ("val_error", "test_error", "test_error_dropout", "train_loss", "best_val_error"):
        assert getattr(got.metrics, key) == getattr(ref.metrics, key), key
    w = weights(tmp_path / "run")
    assert w.keys() == ref_weights.keys()
    assert all(torch.equal(w[k], ref_weights[k]) for k in w), "weights differ"
    # a completed trial keeps its last checkpoint only
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [LAST]


def test_without_the_random_streams_the_resumed_run_differs(tmp_path, uninterrupted, monkeypatch):
    """The comparison above can fail: dropout draws differ when the streams are not restored."""
    _, ref_weights = uninterrupted
    torch.set_num_threads(1)
    monkeypatch.setattr(checkpoints, "set_rng_state", lambda state: None)
    interrupted_then_resumed(tmp_path / "run", "mid-epoch", 1)
    w = weights(tmp_path / "run")
    assert not all(torch.equal(w[k], ref_weights[k]) for k in w)


@pytest.fixture
def stopped_run(tmp_path):
    """A run stopped in its third epoch: epoch 1 and 2 checkpoints."""
    settings = resolve(SETTINGS)
    path = tmp_path / "run"
    with pytest.raises(Interrupt):
        run.train(settings, path, progress=False, callbacks=[InterruptAt("mid-epoch", 2)])
    assert [p.name for p in epoch_checkpoints(path / "checkpoints")] == [
        "epoch-0002.ckpt",
        "epoch-0001.ckpt",
    ]
    return settings, path


def test_a_torn_checkpoint_falls_back_to_the_one_before_then_to_epoch_0(stopped_run, capsys):
    settings, path = stopped_run
    prepared = run.prepare(settings)
    newest, older = epoch_checkpoints(path / "checkpoints")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn mid-write
    found = checkpoints.find(path, prepared.flat, prepared.module)
    assert found is not None and found.path == older and found.epoch == 1
    assert (
        capsys.readouterr().err.strip()
        == f"{newest}: unreadable (RuntimeError), trying the one before"
    )
    older.write_bytes(b"")
    assert checkpoints.find(path, prepared.flat, prepared.module) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"{path}: no checkpoint reads; the trial starts again from epoch 0"


def test_a_checkpoint_of_another_cell_or_network_is_refused(stopped_run):
    settings, path = stopped_run
    before = {p: p.read_bytes() for p in epoch_checkpoints(path / "checkpoints")}
    other = run.prepare(resolve({**SETTINGS, "train.lr": 0.5}))
    with pytest.raises(ResumeError, match=r"is of another cell \(train.lr: 0.01 there, 0.5 here\)"):
        checkpoints.find(path, other.flat, other.module)
    wider = run.prepare(resolve({**SETTINGS, "model.width": 0.25}))
    flat = {**wider.flat, "model.width": 0.125}  # the same cell, as another code version builds it
    with pytest.raises(ResumeError, match="does not load into this code's network"):
        checkpoints.find(path, flat, wider.module)
    assert before == {p: p.read_bytes() for p in epoch_checkpoints(path / "checkpoints")}


def test_the_checkpoint_policy_writes_every_n_epochs_and_always_the_last(tmp_path):
    settings = resolve({**SETTINGS, "train.epochs": 3})
    seen = []

    class Watch(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt")))

    policy = CheckpointPolicy(every_epochs=2, keep_all=True)
    run.train(settings, tmp_path / "run", progress=False, callbacks=[Watch()], policy=policy)
    assert seen == [[], [], ["epoch-0002.ckpt"]]
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["epoch-0002.ckpt", "epoch-0003.ckpt", LAST]


# --- through the sweep: real workers, real signals ------------------------------------------

SWEEP_CELLS = {
    **FAST,
    "data.subset": {"value": 1000},
    "model.variant": {"value": "all-cnn"},
    "model.dropout": {"value": "paper"},
    "model.norm": {"value": "batch"},
    "train.epochs": {"value": 3},
}


def study_of(name: str, url: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def first_checkpoint(name: str, proc: subprocess.Popen, timeout: float = 120) -> Path:
    def found():
        assert proc.poll() is None, proc.communicate()
        return next(Path(f"runs/{name}/trials").glob("*/checkpoints/epoch-0001.ckpt"), None)

    return wait_until(found, timeout, interval=0.05, what="the first epoch checkpoint")


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_a_killed_worker_s_trial_resumes_with_the_same_numbers_and_one_wandb_run(
    tmp_path, in_tmp, backend, request
):
    """SIGKILL of the worker after its first epoch checkpoint: the same command continues
    the trial in its own folder from that checkpoint, with its W&B run, and ends with the
    weights and errors of the same cell run without a stop; status and export count it once."""
    file = write_sweep(tmp_path / "s.yaml", parameters=SWEEP_CELLS)
    urls = {"ref": default_url("ref", Path("runs")), "t": default_url("t", Path("runs"))}
    if backend == "postgresql":
        server = request.getfixturevalue("postgres")
        urls = {name: server.create_db(f"resume_{name}") for name in urls}

    def cmd(name: str, wandb: str) -> list[str]:
        argv = sweep_cli(file, workers=1) + ["--study", name, "--storage", urls[name]]
        return (
            argv[: argv.index("--wandb")] + argv[argv.index("--wandb") + 2 :] + ["--wandb", wandb]
        )

    journal = backend == "journal"  # PostgreSQL: the same path, its numbers compared once
    if journal:
        ref = subprocess.run(cmd("ref", "disabled"), capture_output=True, text=True, timeout=600)
        assert ref.returncode == 0, ref.stderr
    wandb = "offline" if journal else "disabled"
    proc = subprocess.Popen(
        cmd("t", wandb), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first_checkpoint("t", proc)
    (running,) = study_of("t", urls["t"]).get_trials(states=(TrialState.RUNNING,))
    os.kill(running.user_attrs["worker.pid"], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == 1  # a worker died: said
    (killed,) = study_of("t", urls["t"]).get_trials()
    assert killed.state == TrialState.RUNNING  # nobody noticed yet
    again = subprocess.run(cmd("t", wandb), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert (
        "worker 0: trial 1 continues trial 0 from epoch"
        in Path("runs/t/logs/worker-0.log").read_text()
    )

    first, resumed = study_of("t", urls["t"]).get_trials()
    assert trial_state(first) == "interrupted" and trial_state(resumed) == "complete"
    assert "worker died" in first.user_attrs["error_message"]  # not a failed attempt
    assert resumed.user_attrs["resumes"] == 0 and resumed.user_attrs["segments"] == 2
    assert resumed.user_attrs["resumed_from_epoch"] >= 1
    assert resumed.user_attrs["run_dir"] == first.user_attrs["run_dir"]
    if journal:
        (done,) = study_of("ref", urls["ref"]).get_trials()
        for key in ("val/error", "test/error", "test/error_dropout", "train/loss", "epochs_run"):
            assert resumed.user_attrs[key] == done.user_attrs[key], key
        w, w_ref = (weights(Path(t.user_attrs["run_dir"])) for t in (resumed, done))
        assert all(torch.equal(w[k], w_ref[k]) for k in w_ref), "weights differ"

    trials = pd.read_csv("runs/t/export/trials.csv")
    assert list(trials["trial"]) == [1] and list(trials["segments"]) == [2]
    status = subprocess.run(
        [sys.executable, "-m", "ablations.cli", "status", "t", "--storage", urls["t"]],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.stdout.startswith("t: 1 done, 0 running, 0 failed trials"), status.stdout
    if wandb == "offline":  # one W&B run, in two offline segments under the trial's folder
        run_id = resumed.user_attrs["wandb_run_id"]
        assert first.user_attrs["wandb_run_id"] == run_id
        segments = sorted(Path(resumed.user_attrs["run_dir"]).glob("wandb/offline-run-*"))
        assert len(segments) == 2 and all(d.name.endswith(f"-{run_id}") for d in segments)


def test_a_worker_whose_trial_was_taken_over_records_nothing_and_carries_on(tmp_path, in_tmp):
    """Two machines share a study. The first one's worker stops answering (SIGSTOP: its
    heartbeat ages past the grace period); the second presumes it dead and continues its
    trial from the checkpoint. Woken, the first sees the folder is no longer its own: it
    says so in one line, records nothing, and ends with the study."""
    file = write_sweep(
        tmp_path / "s.yaml", parameters={**SWEEP_CELLS, "train.epochs": {"value": 4}}
    )
    env = {**os.environ, "ALLCONV_GRACE_S": "4", "ALLCONV_HEARTBEAT_S": "1"}
    cmd = sweep_cli(file, workers=1)

    def on_host(host: str) -> subprocess.Popen:
        return subprocess.Popen(cmd, env={**env, "ALLCONV_HOST": host}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    first = on_host("node-a")
    first_checkpoint("t", first)
    url = default_url("t", Path("runs"))
    (trial,) = study_of("t", url).get_trials(states=(TrialState.RUNNING,))
    pid = trial.user_attrs["worker.pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        second = on_host("node-b")

        def continued():
            trials = study_of("t", url).get_trials(states=(TrialState.RUNNING,))
            return [t for t in trials if t.user_attrs.get("resumes") == 0]

        wait_until(continued, 120, interval=0.5, what="the second machine to continue the trial")
    finally:
        os.kill(pid, signal.SIGCONT)
    out_b, err_b = second.communicate(timeout=300)
    out_a, err_a = first.communicate(timeout=300)
    assert second.returncode == 0, err_b
    assert first.returncode == 0, err_a
    log = Path("runs/t/logs/worker-0.log").read_text()  # both launchers' worker 0 share it
    said = [line for line in log.splitlines() if "was taken over" in line]
    assert len(said) == 1 and said[0].startswith(
        "worker 0: trial 0 was taken over by another worker"
    )
    trials = study_of("t", url).get_trials()
    assert [trial_state(t) for t in trials] == ["interrupted", "complete"]
    assert "val/error" not in trials[0].user_attrs  # the first recorded nothing
    assert trials[1].user_attrs["segments"] == 2


# --- a real SLURM time limit ----------------------------------------------------------------

SBATCH = Path(__file__).resolve().parents[1] / "sweeps" / "slurm" / "sweep.sbatch"


def test_a_slurm_time_limit_requeues_the_task_and_its_trial_resumes(tmp_path, in_tmp, slurm):
    """sweeps/slurm/sweep.sbatch as a job array: once its trial has a checkpoint the task's
    time limit is brought down to the next minute, SLURM warns the task (--signal) before it,
    the sweep stops with its trial interrupted, the task requeues itself, and the requeued
    task (its limit restored) continues the trial; the study ends with its cell complete
    once. Moving the limit, not a fixed one, makes the warning come mid-trial on a fast or
    a loaded machine alike."""
    cell = {**SWEEP_CELLS, "data.subset": {"value": 256}, "train.epochs": {"value": 200}}
    file = write_sweep(tmp_path / "s.yaml", parameters=cell)
    Path("runs/slurm").mkdir(parents=True)
    url = default_url("t", Path("runs"))
    env = {
        **slurm.env,
        "ABLATE_STORAGE": url,
        "ABLATE_DEVICES": "cpu",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    submit = [
        "sbatch", "--parsable", "--array=0-0", "--time=10", "--signal=B:USR1@40",
        "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}", str(SBATCH), str(file),
        "--workers", "1", "--wandb", "disabled",
    ]  # fmt: skip
    job = subprocess.run(submit, env=env, capture_output=True, text=True, check=True)
    task = f"{job.stdout.strip()}_0"

    def field(name: str) -> str | None:
        shown = slurm.scontrol("show", "job", task).split()
        return next((w.split("=", 1)[1] for w in shown if w.startswith(f"{name}=")), None)

    wait_until(
        lambda: (
            next(Path("runs/t/trials").glob("*/checkpoints/epoch-0002.ckpt"), None)
            if Path("runs/t/trials").exists()
            else None
        ),
        300,
        interval=0.5,
        what="the trial's second checkpoint",
    )
    h, m, sec = (int(x) for x in field("RunTime").split(":"))
    elapsed = 3600 * h + 60 * m + sec
    slurm.scontrol("update", f"JobId={task}", f"TimeLimit={(elapsed + 15) // 60 + 1}")

    def requeued() -> bool:
        return field("Restarts") == "1" and field("JobState") == "PENDING"

    wait_until(requeued, 300, interval=0.5, what="the task to requeue itself")
    # back to ten minutes, and no two-minute wait (SLURM holds a requeued job that long)
    slurm.scontrol("update", f"JobId={task}", "TimeLimit=10", "StartTime=now")
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    state = wait_until(
        lambda: (s if (s := field("JobState")) in ended else None), 600, interval=1,
        what=f"SLURM job {task} to end",
    )  # fmt: skip
    log = "".join(p.read_text() for p in Path("runs/slurm").glob("*.out"))
    assert state == "COMPLETED", log
    assert "time limit near" in log and "restart 1" in log, log
    trials = study_of("t", url).get_trials()
    assert [trial_state(t) for t in trials] == ["interrupted", "complete"], log
    done = trials[-1]
    assert done.user_attrs["segments"] == 2 and done.user_attrs["epochs_run"] == 200
    assert done.user_attrs["resumes"] == 0
    assert {t.user_attrs["run_dir"] for t in trials} == {done.user_attrs["run_dir"]}


# --- the bill before the sweep ----------------------------------------------------------------


def test_dry_run_prints_the_estimated_training_time_per_model_and_writes_nothing(
    tmp_path, in_tmp, capsys
):
    from ablations.cli import main

    file = write_sweep(tmp_path / "s.yaml", parameters={**FAST, "train.epochs": {"value": 3}})
    assert main(["sweep", str(file), "--dry-run", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "estimated training time here (cpu: " in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith("  Model") or line.startswith("  All")
    }
    assert set(rows) == {"Model", "All-CNN-C"}, out
    assert "total: 2 cells, 6 epochs," in out and "with 2 worker(s)" in out
    assert not Path("runs").exists()


def test_the_estimate_of_a_resumed_study_counts_what_its_checkpoints_hold(tmp_path, in_tmp):
    from ablations import estimate
    from ablations.storage import fail_trial
    from ablations.study import open_study
    from ablations.sweep_file import cell_id, load

    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={**FAST, "train.epochs": {"value": 10}, "seed": {"values": [0, 1, 2]},
                    "model.variant": {"value": "all-cnn"}},
    )  # fmt: skip
    sweep = load(file)
    study = open_study(sweep, default_url("t", Path("runs")), "t", create=True)
    cells, _ = sweep.cells()
    done, stopped, _ = cells
    for cell, run_dir in ((done, None), (stopped, tmp_path / "stopped")):
        study.enqueue_trial(cell, user_attrs={"cell": cell_id(cell)})
        trial = study.ask()
        if run_dir is None:
            study.tell(trial, 1.0)
            continue
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "epoch-0004.ckpt").write_bytes(b"")
        trial.set_user_attr("run_dir", str(run_dir))
        fail_trial(study, trial, "interrupted by a signal", interrupted=True)
    cost = estimate.ModelCost("All-CNN-C", 1.0, 0.0, train_batches=6, eval_images=0, device="cpu")
    lines = estimate.estimate(
        sweep, cells, workers=2, threads=1, use_cuda=False, study=study,
        timer=lambda *a: cost,
    )  # fmt: skip
    assert lines[-2] == "total: 3 cells, 30 epochs, 3 min of training; about 90 s with 2 worker(s)"
    # 0 epochs of the done cell, 10 - 4 of the stopped one, 10 of the last
    assert lines[-1].startswith("left in study t: 16 epochs (1 cells done,")


# --- under DDP -------------------------------------------------------------------------------

RUN_DDP = """
import json, sys
from pathlib import Path
import torch
from ablations import checkpoints, run
from ablations.settings import resolve
from tests.test_resume import SETTINGS, InterruptAt, weights
root = Path(sys.argv[1])
settings = resolve(SETTINGS)
ref = run.train(settings, root / "ref", devices=2, progress=False)
try:
    run.train(settings, root / "run", devices=2, progress=False,
              callbacks=[InterruptAt("mid-epoch", 1)])
except Exception as err:
    print("interrupted:", type(err).__name__, file=sys.stderr)
else:
    raise SystemExit("the fit was not interrupted")
prepared = run.prepare(settings)
found = checkpoints.find(root / "run", prepared.flat, prepared.module)
got = run.train(settings, root / "run", devices=2, progress=False, prepared=prepared,
                resume=found)
a, b = weights(root / "ref"), weights(root / "run")
print(json.dumps({
    "same_weights": all(torch.equal(a[k], b[k]) for k in a),
    "errors": [[r.metrics.val_error, r.metrics.test_error, r.metrics.test_error_dropout]
               for r in (ref, got)],
    "segments": got.timings.segments, "from": got.timings.resumed_from_epoch,
    "world_size": got.provenance.world_size,
}))
"""


@pytest.mark.slow
def test_a_ddp_trial_resumes_with_every_rank_s_streams_to_the_same_weights(tmp_path):
    """Two CPU ranks (gloo), stopped in their second epoch: the checkpoint carries both
    ranks' random streams, and the resumed fit ends with the weights and errors of the
    uninterrupted one."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", RUN_DDP, str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["segments"] == 2 and result["from"] == 1, result
    assert result["errors"][0] == result["errors"][1], result
    assert result["same_weights"], result


# --- bad input: a checkpoint that must not be continued --------------------------------------


def _interrupted_study(tmp_path: Path) -> tuple[Path, Path]:
    """A study whose one trial stopped after its first epoch checkpoint, made in-process."""
    from ablations.storage import fail_trial
    from ablations.study import open_study
    from ablations.sweep_file import cell_id, load

    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={**FAST, "train.epochs": {"value": 2}, "model.variant": {"value": "all-cnn"}},
    )
    sweep = load(file)
    study = open_study(sweep, default_url("t", Path("runs")), "t", create=True)
    (cell,), _ = sweep.cells()
    study.enqueue_trial(cell, user_attrs={"cell": cell_id(cell)})
    trial = study.ask()
    settings = resolve({**sweep.base, **cell})
    prepared = run.prepare(settings)
    run_dir = Path("runs/t/trials/0000-All-CNN-C")
    trial.set_user_attr("settings", dict(prepared.flat))
    trial.set_user_attr("run_dir", str(run_dir))
    with pytest.raises(Interrupt):
        run.train(settings, run_dir, progress=False, prepared=prepared,
                  callbacks=[InterruptAt("between epochs", 1)])  # fmt: skip
    fail_trial(study, trial, "interrupted by a signal", interrupted=True)
    return file, run_dir / "checkpoints" / "epoch-0001.ckpt"


@pytest.mark.parametrize(
    "damage,message",
    [
        ("cell", "is of another cell (train.lr: 0.5 there, 0.01 here); move its run folder away"),
        ("network", "does not load into this code's network (unexpected net.extra.weight)"),
    ],
)
def test_a_sweep_refuses_a_checkpoint_it_must_not_continue(
    tmp_path, in_tmp, capsys, damage, message
):
    from ablations.cli import main

    file, ckpt = _interrupted_study(tmp_path)
    state = torch.load(ckpt, weights_only=True)
    if damage == "cell":
        state["allconv"]["cell"]["train.lr"] = 0.5
    else:  # as a later code version's network, with a layer this one lacks
        state["state_dict"]["net.extra.weight"] = torch.zeros(3)
    torch.save(state, ckpt)
    before = {p: p.read_bytes() for p in [ckpt, Path("runs/t/optuna.journal")]}
    capsys.readouterr()
    assert main(["sweep", str(file), "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ablate sweep: error: runs/t/trials/"), err
    assert message in err[0]
    assert before == {p: p.read_bytes() for p in before}
    assert not Path("runs/t/workers").exists()  # no worker started


def test_the_checkpoint_options_are_recorded_with_the_study_and_kept(tmp_path, in_tmp, capsys):
    from ablations.cli import main
    from ablations.resume import CheckpointPolicy

    file = write_sweep(tmp_path / "s.yaml", parameters={**FAST, "train.epochs": {"value": 2}})
    assert main(["sweep", str(file), "--checkpoint-every", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ablate sweep: error: --checkpoint-every 0: give at least 1"
    )
    assert not Path("runs").exists()
    argv = ["sweep", str(file), "--wandb", "disabled"]
    main([*argv, "--checkpoint-every", "2", "--keep-checkpoints", "--max-trials", "1"])
    assert main(argv) == 0  # no options: the study's are kept
    study = optuna.load_study(study_name="t", storage=open_storage(default_url("t", Path("runs"))))
    assert CheckpointPolicy.of(study) == CheckpointPolicy(every_epochs=2, keep_all=True)
    for t in study.get_trials():
        kept = sorted(p.name for p in (Path(t.user_attrs["run_dir"]) / "checkpoints").iterdir())
        assert kept == ["epoch-0002.ckpt", LAST], kept
