"""The contract between `ablate sweep` (the launcher) and its worker processes, in one place:
the environment a worker gets, which signals stop what and when, how a worker follows its
launcher, the status file each worker keeps, and the exit codes with their reasons.

A worker is `python -m ablations.worker SNAPSHOT --study ... --runs-dir ...`, started by the
launcher with SIGINT and SIGTERM blocked (`stops_wait`), its storage URL in `STORAGE_ENV`
and the launcher's pid in `LAUNCHER_PID_ENV`. It writes `runs/<study>/workers/worker-<i>.json`
(`WorkerStatus`) as it goes; the launcher draws its table from those files and, when a worker
exits non-zero, prints the `reason` the worker wrote there before it exited.

Light on purpose (no Optuna, torch or Lightning): a worker reads it before its heavy imports.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import Any

from ablations.files import atomic_write

# --- the environment -------------------------------------------------------------------------

# the storage URL: the environment, not argv, where `ps` would show a database password to
# every user of the machine (`--storage` falls back to it as well)
STORAGE_ENV = "ALLCONV_STORAGE_URL"
LAUNCHER_PID_ENV = "ALLCONV_LAUNCHER_PID"  # a worker stops when this process is gone
HOST_ENV = "ALLCONV_HOST"  # stands in for the hostname (tests, containers sharing one)
HEARTBEAT_ENV = "ALLCONV_HEARTBEAT_S"  # seconds between a running trial's liveness stamps
GRACE_ENV = "ALLCONV_GRACE_S"  # a stamp older than this: its worker (on another host) is gone
# A named, deliberate choice for machines without CUDA (this project's tests): workers the
# launcher pins to GPUs train on the CPU instead of stopping, and say so.
CPU_FOR_GPU_ENV = "ALLCONV_CPU_STANDS_IN_FOR_GPU"
HEARTBEAT_S = float(os.environ.get(HEARTBEAT_ENV, 10))
GRACE_S = float(os.environ.get(GRACE_ENV, 60))


# what torchrun, Kubernetes or a job script set for their own ranks
TORCH_DISTRIBUTED_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
)


def worker_env(url: str, threads: int, devices: str | None) -> dict[str, str]:
    """A worker's environment: ours, plus its storage, its launcher, its threads and GPUs.
    A CPU worker sees no GPU (`CUDA_VISIBLE_DEVICES=""`): on a GPU host it would otherwise
    train on GPU 0, in another precision than the CPU run it stands for."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for name in TORCH_DISTRIBUTED_ENV:  # a job's own ranks are not a trial's (run.TrialEnvironment)
        env.pop(name, None)
    env[STORAGE_ENV] = url
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env["CUDA_VISIBLE_DEVICES"] = "" if devices is None else devices
    return env


def free_ports(n: int) -> list[int]:
    """n distinct ports free now (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def storage_flag(parser) -> None:
    """`--storage URL`, else STORAGE_ENV: a URL with a password given in the environment stays
    out of the command line."""
    parser.add_argument(
        "--storage",
        default=os.environ.get(STORAGE_ENV) or None,
        help=f"Optuna storage URL, else ${STORAGE_ENV} (keeps a database password out of "
        "`ps`), else runs/<study>/optuna.journal",
    )


# --- exit codes ----------------------------------------------------------------------------


class Exit(IntEnum):
    """A worker's (and `ablate sweep`'s) exit codes."""

    OK = 0
    PROBLEMS = 1  # the sweep ran, but cells were given up or workers failed
    BAD_INPUT = 2  # the sweep file or a flag is wrong; nothing ran
    STORAGE_LOST = 3  # the study cannot be read or written (or the disk is full)
    NO_GPU = 4  # given GPUs, CUDA cannot use them here: it does not train on the CPU instead
    INTERRUPTED = 130  # a stop signal; the trial in progress continues on the next run


# errors that say where the run writes is unusable (full, over quota, read-only, not ours):
# the trial is interrupted and the worker stops, rather than failing every cell in turn
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def machine_fault(err: BaseException | None) -> OSError | None:
    """The OSError of a full or unwritable disk in err or its causes, else None."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in MACHINE_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


# --- the status file -----------------------------------------------------------------------


class WorkerStatus:
    """A worker's live line, `workers/worker-<i>.json`, rewritten whole on every change.

    Fields: worker, state (starting, running, testing, waiting, done, interrupted, storage
    lost, launcher gone, crashed, or a trial's outcome), trial, cell, epoch, epochs,
    val_error, devices, threads, updated (Unix time), and `reason`: the one line that says
    why the worker stopped, when it stopped for anything but running out of cells.
    """

    def __init__(self, path: Path | None, worker: int) -> None:
        self.path, self.worker = path, worker
        self.info: dict[str, Any] = {}

    def write(self, **info: Any) -> None:
        self.info.update(info, worker=self.worker, updated=time.time())
        if self.path is None:
            return
        with contextlib.suppress(OSError):  # the display's line (a full disk): never a failure
            atomic_write(self.path, json.dumps(self.info, default=str))

    @staticmethod
    def read(path: Path, worker: int) -> dict[str, Any]:
        """A worker's last line, or `starting` if it has written none yet."""
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {"worker": worker, "state": "starting"}


# --- signals -------------------------------------------------------------------------------


def stop_signals() -> list[int]:
    """The signals that stop a launcher or a worker besides Ctrl-C: SIGTERM (a scheduler's,
    `kill`), and SIGHUP (the terminal closed) unless it is ignored, as under `nohup`, where
    the sweep must keep running."""
    hup = [] if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else [signal.SIGHUP]
    return [signal.SIGTERM, *hup]


@contextlib.contextmanager
def stops_wait() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread while the block runs. A thread's signal mask
    passes through fork and exec, so the processes it starts begin with them blocked. In the
    launcher, while it starts workers: a stop that comes while a worker's interpreter starts
    stays pending until it can take it quietly (`follow_the_launcher` unblocks them), instead
    of a KeyboardInterrupt traceback from the middle of an import, and here a stop waits
    until every started worker is known, so it can be stopped. In a worker, around a DDP
    test pass (run.train): the spawned ranks never take a stop; the worker does (the kernel
    hands it to a thread that does not block it) and holds it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def follow_the_launcher() -> None:
    """In a worker the launcher started, before its heavy imports (seconds): a stop that came
    while the interpreter started, or comes while they run, ends the worker quietly (no trial
    is claimed yet, nothing to record). On Linux the kernel sends SIGINT when the launcher
    dies, SIGKILL included, so the trial in progress is interrupted and marked so, as when the
    launcher forwards Ctrl-C; elsewhere the worker sees `launcher_gone` between trials. Only
    in the worker's own process: DDP ranks re-import the worker module as __mp_main__."""
    if os.environ.get(LAUNCHER_PID_ENV) is None:
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    for signum in stops:
        signal.signal(signum, lambda *_: os._exit(Exit.INTERRUPTED))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # blocked by the launcher until now
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGINT))


def launcher_gone() -> bool:
    """Whether the launcher that started this worker has died (this worker was re-parented)."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    return launcher is not None and str(os.getppid()) != launcher


class Stops:
    """SIGINT and SIGTERM in a worker: raise KeyboardInterrupt (a trial in progress is
    interrupted, not failed), except while held, when they wait until the trial is recorded.

    A flag, not pthread_sigmask: the mask is per thread, and the kernel hands a process's
    signal to any thread not blocking it (the heartbeat's, torch's), after which Python runs
    the handler in the main thread all the same."""

    held = False
    pending: int | None = None

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        if cls.held:
            cls.pending = signum
            return
        raise KeyboardInterrupt

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[None]:
        """This handler for SIGINT and the stop signals, the previous ones restored after
        (tests run workers inside the pytest process)."""
        previous = {n: signal.signal(n, cls.handler) for n in [signal.SIGINT, *stop_signals()]}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @classmethod
    @contextlib.contextmanager
    def held_until_recorded(cls) -> Iterator[None]:
        """Stops that arrive while the block runs wait; `raise_pending` takes them after."""
        cls.held = True
        try:
            yield
        finally:
            cls.held = False

    @classmethod
    def hold(cls) -> None:
        """From now until the record is stored, stops wait (a trial's fit has returned)."""
        cls.held = True

    @classmethod
    def raise_pending(cls) -> None:
        """A stop that waited for the record: now the worker stops."""
        if cls.pending is not None:
            cls.pending = None
            raise KeyboardInterrupt
