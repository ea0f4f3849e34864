"""Faults and bad input around a sweep: signals, dead workers, failing trials, study names,
storage that is not ours, passwords. Each ends in one clear line, and nothing is lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from ablations import launcher, sweep_file
from ablations.cli import main
from ablations.liveness import owner_stamp, process_start
from ablations.process import STORAGE_ENV
from ablations.storage import default_url, describe_url, open_storage
from ablations.study import find, open_study, trial_state
from tests.helpers import (
    FAST,
    load,
    make_study,
    popen_that_records,
    run_worker,
    sweep_cli,
    tree,
    wait_until,
    write_sweep,
)

SLOW_CELLS = {  # a trial trains for several seconds: long enough to be interrupted
    **FAST,
    "data.subset": {"value": 2000},
    "train.epochs": {"value": 3},
    "model.variant": {"values": ["base", "all-cnn"]},
}
# fails at run time, after the sweep file parsed: the synthetic set has 8000 images
FAILING = {**FAST, "data.subset": {"value": 100_000}}


def running_trials(timeout=120):
    """The running trials a worker has stamped with its pid, once there is one."""

    def stamped():
        if not Path("runs/t/optuna.journal").exists():
            return []
        try:
            running = load().get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:
            return []
        return [t for t in running if "worker.pid" in t.user_attrs]

    return wait_until(stamped, timeout, interval=0.5, what="a trial to start")


def as_from_a_terminal() -> None:
    """preexec_fn: Ctrl-C and SIGHUP act as they do on a terminal. A job started in the
    background of a shell (a CI runner's, say) ignores SIGINT, and under nohup SIGHUP, and
    a child keeps that; `ablate sweep` then rightly ignores them too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def alive(pid: int) -> bool:
    return process_start(pid) is not None


def test_sigterm_stops_the_workers_and_their_trials_are_interrupted_not_failed(tmp_path, in_tmp):
    """SIGTERM to `ablate sweep`: no worker outlives it, the trials it stopped are marked
    interrupted; after two such stops on the same cells the same command still runs them
    (an interrupt is not a failed attempt) and finishes every cell once."""
    file = write_sweep(tmp_path / "s.yaml", parameters=SLOW_CELLS)
    cmd = sweep_cli(file, workers=2)
    for _ in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pids = [t.user_attrs["worker.pid"] for t in running_trials()]
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "interrupted: run the same command again to continue" in err
        assert "Traceback" not in err
        assert not any(alive(pid) for pid in pids)
    states = [trial_state(t) for t in load().get_trials()]
    assert "failed" not in states and states.count("interrupted") >= 2
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    trials = load().get_trials()
    done = [t.user_attrs["cell"] for t in trials if trial_state(t) == "complete"]
    assert sorted(done) == sorted(set(done)) and len(done) == 2
    assert "0 given up" in out.stdout


def test_sigkill_of_the_launcher_leaves_no_worker_running_the_sweep(tmp_path, in_tmp):
    """SIGKILL gives the launcher no chance to stop its workers: the kernel's parent-death
    signal stops each one at once, its trial interrupted (not failed, not left running); the
    same command runs every cell once. One cell: a worker that outlived the launcher would
    finish its 3-epoch trial (state complete, not interrupted) or be caught alive."""
    file = write_sweep(
        tmp_path / "s.yaml", parameters={**SLOW_CELLS, "model.variant": {"value": "base"}}
    )
    cmd = sweep_cli(file, workers=1)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (trial,) = running_trials()
    proc.kill()
    proc.wait()
    pid = trial.user_attrs["worker.pid"]
    wait_until(lambda: not alive(pid), 30, interval=0.2)  # well inside the 3-epoch trial
    assert not alive(pid), "the worker kept running the sweep"
    states = [trial_state(t) for t in load().get_trials()]
    assert states == ["interrupted"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "1/1 done" in out.stdout


def test_a_killed_worker_does_not_hang_the_one_that_lives(tmp_path, in_tmp):
    """SIGKILL of worker 1 while worker 0 trains: the launcher reaps it (an unreaped zombie
    looked alive to the stale-trial check, and worker 0 waited for its cell forever), worker
    0 runs the dead worker's cell again, and the sweep ends."""
    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={**SLOW_CELLS, "train.epochs": {"value": 2}, "seed": {"values": [0, 1]}},
    )
    env = {**os.environ, "ALLCONV_GRACE_S": "5", "ALLCONV_HEARTBEAT_S": "1"}
    proc = subprocess.Popen(
        sweep_cli(file, workers=2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )

    def second_worker():
        for t in running_trials():
            if t.user_attrs.get("worker.pid") and proc.poll() is None:
                workers = sorted(
                    {
                        x.user_attrs["worker.pid"]
                        for x in load().get_trials()
                        if "worker.pid" in x.user_attrs
                    }
                )
                if len(workers) == 2:
                    return workers[1]
        return None

    victim = wait_until(second_worker, 180, interval=0.5)
    assert victim is not None, "both workers never ran at once"
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err  # a worker died: said, not hidden
    assert "worker exit codes" in err
    trials = load().get_trials()
    done = {t.user_attrs["cell"] for t in trials if trial_state(t) == "complete"}
    assert len(done) == 4
    killed = [t for t in trials if trial_state(t) == "interrupted"]
    assert killed and all("worker died" in t.user_attrs["error_message"] for t in killed)


def test_a_sweep_that_cannot_run_is_refused_before_any_worker_starts(tmp_path, in_tmp, capsys):
    """Preflight: a data split no cell can make (the synthetic set has 8000 images) exits 2
    in seconds, in --dry-run too, writing nothing; the same for a random sweep."""
    file = write_sweep(tmp_path / "s.yaml", parameters=FAILING)
    for extra in ([], ["--dry-run"]):
        assert main(["sweep", str(file), "--wandb", "disabled", *extra]) == 2
        err = capsys.readouterr().err
        assert "every grid cell fails its data split: data.subset=100000 is larger" in err
    random = write_sweep(
        tmp_path / "r.yaml",
        method="random",
        run_cap=10,
        parameters={**FAILING, "train.lr": {"distribution": "uniform", "min": 0.01, "max": 0.1}},
    )
    assert main(["sweep", str(random), "--wandb", "disabled"]) == 2
    assert "data: data.subset=100000 is larger" in capsys.readouterr().err
    assert tree(in_tmp) == ["r.yaml", "s.yaml"]  # the two sweep files, nothing else


def test_a_grid_cell_whose_split_cannot_work_is_skipped_with_its_reason(tmp_path, in_tmp, capsys):
    file = write_sweep(
        tmp_path / "s.yaml",
        parameters={
            **FAST,
            "data.subset": {"values": [256, 100_000]},
            "model.variant": {"value": "all-cnn"},
        },
    )
    assert main(["sweep", str(file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 cells to run, 1 invalid skipped" in out and "data.subset=100000 is larger" in out


def _failing_trials(monkeypatch):
    from ablations import run

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(run, "train", boom)


def test_a_grid_whose_trials_all_fail_exits_1_with_the_reason_and_can_be_retried(
    tmp_path, in_tmp, monkeypatch, capsys
):
    """A failure only a run finds (here every fit raises): each cell is tried twice, then
    given up; the sweep says so with each error and its count, exits 1, and --retry-failed
    runs the given-up cells once the cause is gone."""
    file = write_sweep(tmp_path / "s.yaml")
    with monkeypatch.context() as m:
        _failing_trials(m)
        run_worker(file)
    assert [trial_state(t) for t in load().get_trials()] == ["failed"] * 4
    assert main(["sweep", str(file), "--wandb", "disabled"]) == 1
    out, err = capsys.readouterr()
    assert "nothing left to run (0/2 done, 4 failed trials, 2 given up)" in out
    assert "a cell is given up after 2 failed trials" in err and "4 x RuntimeError: boom" in err
    assert "--retry-failed" in err
    retry = subprocess.run(
        [*sweep_cli(file, workers=1), "--retry-failed"], capture_output=True, text=True, timeout=300
    )
    assert retry.returncode == 0, retry.stderr
    assert "2/2 done, 4 failed trials, 0 left, 0 given up" in retry.stdout


def test_a_random_sweep_whose_trials_all_fail_stops(tmp_path, in_tmp, monkeypatch, capsys):
    """Failed trials do not count toward run_cap; without a bound a random sweep with a
    missing data set made thousands of failed trials a minute. It stops after 5 in a row."""
    file = write_sweep(
        tmp_path / "s.yaml",
        method="random",
        run_cap=100,
        parameters={
            "model.variant": {"value": "all-cnn"},
            "train.lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1},
        },
    )
    with monkeypatch.context() as m:
        _failing_trials(m)
        run_worker(file)
    assert len(load().get_trials()) == 5
    assert main(["sweep", str(file), "--wandb", "disabled"]) == 1
    err = capsys.readouterr().err
    assert "the sweep stops after 5 failed trials in a row" in err
    assert "5 x RuntimeError: boom" in err


def test_status_names_a_dead_workers_trial(tmp_path, in_tmp, capsys):
    file = write_sweep(tmp_path / "s.yaml")
    assert main(["sweep", str(file), "--dry-run"]) == 0
    sweep = sweep_file.load(file)
    study = open_study(sweep, default_url("t"), "t", create=True)
    trial = study.ask()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("cell", sweep_file.cell_id(sweep.cells()[0][0]))
    for key, value in {**owner_stamp(), "worker.pid": dead.pid}.items():
        trial.set_user_attr(key, value)
    capsys.readouterr()
    assert main(["status", "t"]) == 0
    assert f"running, worker gone (worker pid {dead.pid}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sweep", "FILE", "--study", "../escape"], "--study '../escape' is not a valid study"),
        (["sweep", "FILE", "--study", "/tmp/x"], "--study '/tmp/x' is not a valid study"),
        (["status", "../escape"], "study name '../escape' is not a valid study"),
        (["export", ".."], "study name '..' is not a valid study"),
    ],
)
def test_study_names_cannot_leave_runs(tmp_path, in_tmp, capsys, argv, message):
    file = write_sweep(tmp_path / "s.yaml")
    before = tree(tmp_path)
    argv = [str(file) if a == "FILE" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_a_sweep_file_named_dotdot_is_refused(tmp_path, in_tmp, capsys):
    file = write_sweep(tmp_path / "s.yaml", name="..")
    assert main(["sweep", str(file)]) == 2
    assert "name: '..' is not a valid study name" in capsys.readouterr().err
    assert tree(in_tmp) == ["s.yaml"]


def test_storage_that_is_not_a_journal_is_left_alone(tmp_path, in_tmp, capsys):
    notes = in_tmp / "notes.txt"
    notes.write_text("my notes\n")
    file = write_sweep(tmp_path / "s.yaml")
    assert main(["sweep", str(file), "--storage", str(notes), "--wandb", "disabled"]) == 2
    assert "is not an Optuna journal" in capsys.readouterr().err
    assert notes.read_text() == "my notes\n"
    (in_tmp / "adir").mkdir()
    assert main(["sweep", str(file), "--storage", "adir", "--wandb", "disabled"]) == 2
    assert "adir is a directory, not an Optuna journal file" in capsys.readouterr().err


def test_passwords_are_masked_in_messages():
    assert describe_url("postgresql://u:SECRET@h:5432/db") == "postgresql://u:***@h:5432/db"
    masked = describe_url("postgresql://h/db?user=u&password=SECRET&sslmode=require")
    assert "SECRET" not in masked and masked.endswith("password=***&sslmode=require")


def test_workers_get_the_storage_url_from_the_environment_not_argv(tmp_path, in_tmp, monkeypatch):
    """`ps` shows every process's argv to every user: a database password must not be there."""
    seen = []
    monkeypatch.setattr(launcher.subprocess, "Popen", popen_that_records(seen))
    file = write_sweep(tmp_path / "s.yaml")
    url = str(in_tmp / "runs" / "t" / "optuna.journal")
    main(["sweep", str(file), "--storage", url, "--workers", "2", "--wandb", "disabled"])
    assert len(seen) == 2
    for cmd, env in seen:
        assert url not in " ".join(cmd)
        assert env[STORAGE_ENV] == url


@pytest.mark.parametrize("damage", ["torn last line", "garbage line", "torn then appended"])
def test_a_damaged_journal_is_repaired_and_keeps_every_complete_trial(tmp_path, in_tmp, damage):
    make_study(in_tmp)
    journal = in_tmp / "runs/paper/optuna.journal"
    before = {
        t.number: t.user_attrs.get("val/error") for t in find("paper", None, Path("runs"))[0].trials
    }
    torn = b'{"op_code": 5, "worker_id": "w", "trial_id": 3, "us'
    with open(journal, "ab") as f:
        if damage == "torn last line":
            f.write(torn)
        elif damage == "garbage line":
            f.write(b"garbage\n")
        else:  # the next writer's record glued to the torn bytes, then a good record
            lines = journal.read_bytes().splitlines(keepends=True)
            same = next(x for x in lines if b'"sweep.name"' in x)  # replaying it changes nothing
            f.write(torn + same + same)
    assert main(["status", "paper"]) == 0
    study, _ = find("paper", None, Path("runs"))
    study.set_user_attr("after", 1)  # a write after the repair
    again, _ = find("paper", None, Path("runs"))
    assert {t.number: t.user_attrs.get("val/error") for t in again.trials} == before
    assert again.user_attrs["after"] == 1
    assert (
        (in_tmp / "runs/paper/optuna.journal.torn")
        .read_bytes()
        .startswith(torn if damage != "garbage line" else b"garbage")
    )


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "is a directory; give a sweep file (YAML)"),
        (b"\xff\xfe\x00\x81binary", "is not a text file; give a sweep file (YAML)"),
        (
            b"name: a\nname: b\nmethod: grid\nparameters:\n  seed: {value: 1}\n",
            "line 2: key 'name' is given twice",
        ),
    ],
    ids=["directory", "binary", "duplicate-key"],
)
def test_sweep_files_that_are_not_sweep_files(tmp_path, in_tmp, capsys, content, message):
    path = tmp_path / "s.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not Path("runs").exists()


def test_export_out_must_be_a_folder(tmp_path, in_tmp, capsys):
    make_study(in_tmp)
    (in_tmp / "afile").write_text("keep me\n")
    before = tree(in_tmp)
    assert main(["export", "paper", "--out", "afile"]) == 2
    assert "--out afile: is a file; give a folder" in capsys.readouterr().err
    assert main(["export", "paper", "--out", "afile/sub"]) == 2
    assert "--out afile/sub: is under afile, which is a file" in capsys.readouterr().err
    assert tree(in_tmp) == before and (in_tmp / "afile").read_text() == "keep me\n"


def test_an_export_killed_mid_write_leaves_no_staging_folder_behind(tmp_path, in_tmp):
    make_study(in_tmp)
    out = in_tmp / "runs/paper/export"
    (out / ".export-999999999-abc").mkdir(parents=True)  # a dead export's staging folder
    (out / ".export-999999999-abc/summary.csv").write_text("half")
    assert main(["export", "paper", "--format", "csv"]) == 0
    assert not list(out.glob(".export-*"))


def test_gpu_accelerator_without_a_gpu_is_refused_before_writing(in_tmp, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["train", "data.dataset=synthetic", "train.accelerator=gpu", "--quiet"])
    assert code == 2
    assert "train.accelerator=gpu: no CUDA GPU is visible here" in capsys.readouterr().err
    assert not Path("runs").exists()


def test_a_sweep_with_wandb_disabled_still_writes_its_exports(tmp_path, in_tmp):
    file = write_sweep(tmp_path / "s.yaml")
    out = subprocess.run(sweep_cli(file, workers=1), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (in_tmp / "runs/t/export/summary.csv").is_file()
    assert not list((in_tmp / "runs/t").glob("wandb"))


# --- storage and disks under a running sweep -------------------------------------------------


@contextlib.contextmanager
def read_only(path: Path):
    """path (a folder or a file) unwritable while the block runs. Root ignores permissions,
    so there a read-only bind mount; elsewhere chmod. Skips where neither can be done."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if bind.returncode:
        pytest.skip(f"cannot make {path} read-only here: {bind.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at path (root only); skips where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the filesystem at disk, leaving about `leave` bytes free."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(0, free - leave))
    return filler


def one_line_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def complete_once(cells: int) -> None:
    trials = load().get_trials()
    done = [t.user_attrs["cell"] for t in trials if trial_state(t) == "complete"]
    assert len(done) == len(set(done)) == cells, done


def test_a_read_only_runs_folder_ends_train_sweep_and_export_in_one_line(tmp_path, in_tmp):
    make_study(in_tmp)
    file = write_sweep(tmp_path / "s.yaml")
    before = tree(in_tmp)
    runs = in_tmp / "runs"
    train = [sys.executable, "-m", "ablations.cli", "train", "data.dataset=synthetic", "--quiet"]
    with read_only(runs):
        for cmd, message in [
            (train, "cannot write runs/train"),
            (sweep_cli(file, workers=1), "runs folder runs cannot be written"),
            ([sys.executable, "-m", "ablations.cli", "export", "paper"], "cannot write runs/paper"),
        ]:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2, (cmd, out.stderr)
            assert message in out.stderr, out.stderr
            one_line_no_traceback(out.stderr)
            assert out.stderr.strip().count("\n") == 0, out.stderr
    assert tree(in_tmp) == before


def test_a_read_only_journal_stops_the_sweep_then_it_resumes(tmp_path, in_tmp):
    file = write_sweep(tmp_path / "s.yaml")
    cmd = sweep_cli(file, workers=1)
    assert subprocess.run([*cmd, "--max-trials", "1"], capture_output=True).returncode == 0
    journal = in_tmp / "runs/t/optuna.journal"
    content = journal.read_bytes()
    with read_only(journal):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "cannot write runs/t/optuna.journal" in out.stderr
    one_line_no_traceback(out.stderr)
    assert journal.read_bytes() == content
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    complete_once(2)


def test_a_journal_deleted_mid_sweep_is_not_recreated(tmp_path, in_tmp):
    """Optuna appends with open(path, "ab"): a deleted journal came back holding only the
    operations after the deletion, and every reader died with JSONDecodeError."""
    params = {**SLOW_CELLS, "train.epochs": {"value": 2}, "seed": {"values": [0, 1]}}
    file = write_sweep(tmp_path / "s.yaml", parameters=params)
    cmd = sweep_cli(file, workers=2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running_trials()
    # a trial is training in its folder (on a timeout the test goes on regardless, as before)
    wait_until(lambda: list(in_tmp.glob("runs/t/trials/*/settings.yaml")), 120, interval=0.1)
    journal = in_tmp / "runs/t/optuna.journal"
    journal.unlink()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "was deleted while the sweep ran" in err, err
    one_line_no_traceback(err)
    for log in (in_tmp / "runs/t/logs").glob("*.log"):
        one_line_no_traceback(log.read_text())
    assert not journal.exists()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # a new study
    assert out.returncode == 0, out.stderr
    complete_once(4)
    folders = sorted(p.name for p in (in_tmp / "runs/t/trials").iterdir())
    assert len(folders) == len(set(folders)) and any(f.endswith("-2") for f in folders)


def test_a_full_disk_loses_no_finished_trial_and_the_rerun_finishes(tmp_path, in_tmp):
    """The runs folder on a small tmpfs, filled while the sweep runs: one clear line, the
    journal still readable with the finished trial, and after space is freed the same
    command finishes every cell once. Two cells: the first finishes before the disk fills,
    the second is the one it stops."""
    params = {**SLOW_CELLS, "train.epochs": {"value": 1}}
    file = write_sweep(tmp_path / "s.yaml", parameters=params)
    cmd = sweep_cli(file, workers=1)
    with small_disk(in_tmp / "runs", "20m") as disk:
        first = subprocess.run([*cmd, "--max-trials", "1"], capture_output=True, text=True)
        assert first.returncode == 0, first.stderr
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running_trials()
        filler = fill(disk)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, out
        assert "No space left on device" in err, err
        one_line_no_traceback(err)
        filler.unlink()
        status = subprocess.run(
            [sys.executable, "-m", "ablations.cli", "status", "t"], capture_output=True, text=True
        )
        assert status.returncode == 0, status.stderr
        assert [trial_state(t) for t in load().get_trials()][0] == "complete"
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
        complete_once(2)


def test_a_failed_append_is_cut_back_and_a_torn_tail_set_aside(tmp_path, monkeypatch):
    """Below the sweep: a write that fails half-way leaves the journal as it was, and a torn
    tail left by a killed writer is moved to <journal>.torn before the next record."""
    path = tmp_path / "j.journal"
    storage = open_storage(str(path), create=True)
    optuna.create_study(study_name="a", storage=storage)
    size = path.stat().st_size

    class DiskFull:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:7])  # part of the record reaches the file, then ENOSPC
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(
        "ablations.journal.open",
        lambda p, mode="r": DiskFull(open(p, mode)),  # noqa: SIM115
        raising=False,
    )
    with pytest.raises(OSError, match="No space"):
        optuna.load_study(study_name="a", storage=storage).set_user_attr("lost", 1)
    monkeypatch.undo()
    assert path.stat().st_size == size
    with open(path, "ab") as f:
        f.write(b'{"op_code":5,"worker_id":"w","tri')  # a writer killed mid-record
    optuna.load_study(study_name="a", storage=storage).set_user_attr("after", 1)
    again = optuna.load_study(study_name="a", storage=open_storage(str(path)))
    assert again.user_attrs == {"after": 1}
    assert path.with_name("j.journal.torn").read_bytes() == b'{"op_code":5,"worker_id":"w","tri\n'


def test_a_sweep_file_edited_under_a_running_sweep_changes_nothing_under_it(tmp_path, in_tmp):
    """Workers read the launcher's snapshot (runs/<study>/sweep.yaml), not the file; the
    edited file is then checked against the study on the next run."""
    params = {**SLOW_CELLS, "train.epochs": {"value": 2}, "seed": {"values": [0, 1]}}
    file = write_sweep(tmp_path / "s.yaml", parameters=params)
    cmd = sweep_cli(file, workers=2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running_trials()
    write_sweep(file, parameters={**params, "seed": {"values": [0, 1, 2]}})
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "4/4 done" in out
    complete_once(4)
    assert (in_tmp / "runs/t/sweep.yaml").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "was made from a different sweep definition (differs in: parameters)" in again.stderr
    one_line_no_traceback(again.stderr)


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGINT, signal.SIGINT), (signal.SIGHUP,)],
    ids=["second-ctrl-c", "sighup-terminal-closed"],
)
def test_ctrl_c_twice_or_sighup_stops_the_sweep_without_a_traceback(tmp_path, in_tmp, signals):
    """A second Ctrl-C while the launcher stops its workers; SIGHUP (the terminal closed)
    stops the sweep as SIGTERM does. No traceback, no worker left, nothing failed."""
    file = write_sweep(tmp_path / "s.yaml", parameters=SLOW_CELLS)
    proc = subprocess.Popen(
        sweep_cli(file, workers=2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    pids = [t.user_attrs["worker.pid"] for t in running_trials()]
    for signum in signals:
        proc.send_signal(signum)
        time.sleep(0.5)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: run the same command again to continue" in err
    one_line_no_traceback(err)
    assert not any(alive(pid) for pid in pids)
    states = [trial_state(t) for t in load().get_trials()]
    assert states and "failed" not in states


def test_a_signal_after_training_before_the_record_keeps_the_run(tmp_path, in_tmp):
    """SIGTERM the moment a trial's result.yaml is written (training over, study not yet
    told): the trial is recorded complete, then the worker stops."""
    params = {**SLOW_CELLS, "train.epochs": {"value": 1}, "seed": {"values": [0, 1]}}
    file = write_sweep(tmp_path / "s.yaml", parameters=params)
    proc = subprocess.Popen(
        sweep_cli(file, workers=1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    (trial,) = running_trials()
    # polled every millisecond: the window between result.yaml and the record is short
    wait_until(lambda: list(in_tmp.glob("runs/t/trials/*/result.yaml")), 300, interval=0.001)
    os.kill(trial.user_attrs["worker.pid"], signal.SIGTERM)  # the one worker's pid
    proc.communicate(timeout=120)
    first = load().get_trials()[0]
    assert trial_state(first) == "complete", first.user_attrs.get("error_message")


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_during_the_test_pass_keeps_the_trained_run(tmp_path, in_tmp, ranks):
    """SIGTERM to the whole process group (a scheduler's stop: scancel, systemd, docker
    stop) while a trained run is tested. trainer.test installs Lightning's own SIGTERM
    handler, which used to end the pass and interrupt the trial; now the pass finishes, the
    trial is recorded complete with its test error, then the worker stops. With 2 DDP ranks
    the signal reaches the spawned ranks too, and the worker's own hold does not come from
    a callback (those run in the ranks)."""
    params = {
        **SLOW_CELLS,
        "train.epochs": {"value": 1},
        "train.eval_batch_size": {"value": 2},  # 500 test batches, twice: a pass of seconds
        # DDP: each rank trains on half of a smaller set; the test pass is as long
        **({"data.subset": {"value": 512}} if ranks > 1 else {}),
    }
    file = write_sweep(tmp_path / "s.yaml", parameters=params)
    proc = subprocess.Popen(
        [*sweep_cli(file, workers=1), "--devices-per-trial", str(ranks)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    running_trials()
    status = Path("runs/t/workers/worker-0.json")

    def testing():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(status.read_text()).get("state") == "testing"
        return False

    if not wait_until(testing, 300, interval=0.02):
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the trial's test pass never started")
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher and its worker, at once
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    one_line_no_traceback(err)
    trials = load().get_trials()
    assert trial_state(trials[0]) == "complete", trials[0].user_attrs.get("error_message")
    assert 0 <= trials[0].user_attrs["test/error"] <= 100
    assert len(trials) == 1  # the worker stopped after recording it: the other cell is left


def test_export_and_status_of_a_study_with_no_trials_or_not_ours(tmp_path, in_tmp, capsys):
    file = write_sweep(tmp_path / "s.yaml")
    open_study(sweep_file.load(file), default_url("t"), "t", create=True)  # made, nothing run
    optuna.create_study(
        study_name="foreign", storage=open_storage(default_url("foreign"), create=True)
    )
    before = tree(in_tmp)
    assert main(["status", "t"]) == 0
    assert main(["export", "t"]) == 2
    assert "no trials" in capsys.readouterr().err
    for cmd in ("status", "export"):
        assert main([cmd, "foreign"]) == 2
        err = capsys.readouterr().err
        assert "was not made by `ablate sweep`" in err and err.count("\n") == 1
    assert tree(in_tmp) == before


@pytest.mark.parametrize("moment", ["preflight", "workers importing"])
def test_ctrl_c_while_a_sweep_starts_ends_without_a_traceback(tmp_path, in_tmp, moment):
    """Ctrl-C before any trial: one line on the terminal, and no traceback in a worker's log
    either (a worker spends its first seconds importing torch and Lightning)."""
    file = write_sweep(tmp_path / "s.yaml")
    proc = subprocess.Popen(
        sweep_cli(file, workers=1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    sign = Path("runs") if moment == "preflight" else Path("runs/t/logs/worker-0.log")
    wait_until(sign.exists, 60, interval=0.05)
    assert sign.exists()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130, or killed by SIGINT (-2), which a shell also reports as 130: about 1 run in 50
    # here ends that way, after the message, with no traceback and every worker stopped;
    # why is not found yet (no traceback: a SIGINT after Python restored its default?)
    assert proc.returncode in (130, -signal.SIGINT), err
    one_line_no_traceback(err)
    for log in Path("runs").glob("t/logs/worker-*.log"):
        assert "Traceback" not in log.read_text()
