"""Whether a running trial's worker is alive: a stamp (host, pid, process start time) set
when it claims the trial, and a heartbeat from a thread while it trains. A dead worker's
trial is marked interrupted (not a failed attempt) by the next worker that claims a cell."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from ablations import process
from ablations.storage import fail_trial

# A worker stamps its running trial every HEARTBEAT_S; a stamp older than GRACE_S means the
# worker (on another host, where its pid cannot be checked) is gone.
HEARTBEAT_S, GRACE_S = process.HEARTBEAT_S, process.GRACE_S


def process_start(pid: int) -> float | None:
    """When the process started (pid plus this is unique); None when it is gone, or a zombie
    (dead, not yet reaped by its parent). psutil, so it reads the same on Linux and macOS."""
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def _same_process(started: float | None, stamped: object) -> bool:
    # a stamp from before psutil (clock ticks as a string) never matches: its worker is gone
    return started is not None and isinstance(stamped, float) and abs(started - stamped) < 0.01


def hostname() -> str:
    return os.environ.get(process.HOST_ENV) or socket.gethostname()


def owner_stamp() -> dict[str, object]:
    pid = os.getpid()
    return {
        "worker.host": hostname(),
        "worker.pid": pid,
        "worker.start": process_start(pid),
        "worker.heartbeat": time.time(),
    }


def is_stale(trial: FrozenTrial, now: float | None = None) -> str | None:
    """Why a RUNNING trial's worker is dead, or None if it may be alive."""
    attrs = trial.user_attrs
    now = time.time() if now is None else now
    if "worker.pid" not in attrs:
        # created but never stamped: its worker died between ask and stamp, or it's foreign
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return "no worker stamp" if now - started > GRACE_S else None
    if attrs.get("worker.host") == hostname():
        pid = int(attrs["worker.pid"])
        if not _same_process(process_start(pid), attrs.get("worker.start")):
            return f"worker pid {pid} on {attrs['worker.host']} is gone"
        return None
    age = now - float(attrs.get("worker.heartbeat", 0))
    if age > GRACE_S:
        return f"no heartbeat from {attrs.get('worker.host')} for {age:.0f} s"
    return None


def fail_stale(study: optuna.Study) -> list[int]:
    """Fail every RUNNING trial whose worker is dead; returns their numbers."""
    # Our own check for every storage, not optuna.storages.fail_stale_trials: the same
    # heartbeat (stamped by Heartbeat below), and the trial is marked interrupted, which
    # Optuna's plain FAIL cannot say; a dead machine's trial is not a failed attempt.
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = is_stale(t)
        if why is not None and fail_trial(study, t, f"worker died: {why}", interrupted=True):
            failed.append(t.number)
    return failed


class Heartbeat:
    """Stamps a trial every HEARTBEAT_S seconds from a daemon thread until stopped."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "worker.heartbeat", time.time())
                if hasattr(self.storage, "record_heartbeat"):
                    self.storage.record_heartbeat(self.trial_id)
            except Exception:
                pass  # the trial may have finished, or the database blipped; keep trying

    def __enter__(self) -> Heartbeat:
        if hasattr(self.storage, "record_heartbeat"):
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
