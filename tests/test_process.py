"""The launcher-worker contract (ablations/process.py): a worker's reason for stopping reaches
the launcher through its status file; files are replaced whole; a worker's liveness."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ablations import launcher, process
from ablations.files import atomic_write
from ablations.liveness import process_start
from tests.helpers import FAST, wait_until, write_sweep

ROOT = Path(__file__).resolve().parents[1]


def test_a_workers_reason_to_stop_is_in_its_status_and_the_launcher_prints_it(tmp_path):
    """A real worker process told to join a study that does not exist: exit 2, and the
    reason, not a line of its log, is what the launcher shows."""
    file = write_sweep(tmp_path / "s.yaml", parameters=FAST)
    runs = tmp_path / "runs" / "t"
    status = runs / "workers" / "worker-0.json"
    status.parent.mkdir(parents=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        process.STORAGE_ENV: str(tmp_path / "runs" / "t" / "optuna.journal"),
    }
    argv = [sys.executable, "-m", "ablations.worker", str(file), "--study", "t"]
    argv += ["--runs-dir", str(runs), "--status", str(status)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == process.Exit.BAD_INPUT, done.stderr[-2000:]
    reason = json.loads(status.read_text())["reason"]
    assert "does not exist" in reason, reason
    assert f"worker 0: {reason}" in done.stderr
    assert launcher._reason(runs, 0) == reason


def test_the_reason_shown_masks_a_database_password(tmp_path):
    status = process.WorkerStatus(tmp_path / "workers" / "worker-1.json", 1)
    (tmp_path / "workers").mkdir()
    status.write(reason="storage postgresql://me:secret@db/x failed: gone")
    assert launcher._reason(tmp_path, 1) == "storage postgresql://me:***@db/x failed: gone"
    assert "no reason in its status" in launcher._reason(tmp_path, 0)  # killed: no file


def test_atomic_write_leaves_the_old_file_or_the_new_one_and_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, "old")
    with pytest.raises(TypeError):
        atomic_write(path, 12)  # fails after the temporary is made
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    atomic_write(path, b"new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_liveness_knows_a_live_process_a_zombie_and_a_reaped_one():
    assert process_start(os.getpid()) is not None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until(lambda: process_start(child.pid) is None, 60, what="the child to exit")
    assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE  # not yet reaped
    child.wait()
    assert process_start(child.pid) is None
