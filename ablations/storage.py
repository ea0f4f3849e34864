"""Where a study lives (a journal file, or any Optuna RDB URL), a lock for claiming cells,
and the liveness stamps that let a worker tell a dead trial from a slow one."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from ablations.sweep_file import SweepError

RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")
# A worker stamps its running trial this often; a stamp older than GRACE means the worker
# (on another host, where its pid cannot be checked) is gone.
HEARTBEAT_S = float(os.environ.get("ALLCONV_HEARTBEAT_S", 10))
GRACE_S = float(os.environ.get("ALLCONV_GRACE_S", 60))

optuna.logging.set_verbosity(optuna.logging.WARNING)


# how the launcher hands a worker its storage URL: the environment, not argv, where `ps`
# would show a database password to every user of the machine
STORAGE_ENV = "ALLCONV_STORAGE_URL"


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


def add_storage_flag(parser) -> None:
    """`--storage URL`, else ALLCONV_STORAGE_URL: a URL with a password given in the
    environment stays out of the command line, which `ps` shows to every user."""
    parser.add_argument(
        "--storage",
        default=os.environ.get(STORAGE_ENV) or None,
        help=f"Optuna storage URL, else ${STORAGE_ENV} (keeps a database password out of "
        "`ps`), else runs/<study>/optuna.journal",
    )


def default_url(study: str, root: Path = Path("runs")) -> str:
    return str(root / study / "optuna.journal")


def is_rdb(url: str) -> bool:
    return urlsplit(url).scheme.split("+")[0] in RDB_SCHEMES


def describe_url(url: str) -> str:
    """The URL without its password (user:PASSWORD@ or ?password=...), for messages."""
    # a regex, not urlsplit: it also masks a URL inside a longer string (--storage=URL)
    url = re.sub(r"(://[^:/@\s]*:)[^\s]*@", r"\1***@", url)
    return re.sub(r"(?i)([?&]password=)[^&\s]*", r"\1***", url)


def open_storage(url: str, *, create: bool = False) -> optuna.storages.BaseStorage:
    """A journal file path, or an RDB URL. Unreachable storage raises SweepError."""
    if is_rdb(url):
        postgres = urlsplit(url).scheme.startswith("postgres")
        if postgres:
            check_postgres(url)
        try:
            # Optuna creates its tables on first use; machines starting together on an empty
            # database would race on CREATE TABLE, so they take turns.
            with _pg_advisory_lock(url, "optuna-schema") if postgres else contextlib.nullcontext():
                return RDBStorage(
                    url,
                    heartbeat_interval=int(HEARTBEAT_S),
                    grace_period=int(GRACE_S),
                    engine_kwargs={"pool_pre_ping": True},
                )
        except Exception as err:
            raise SweepError(
                f"storage {describe_url(url)} cannot be used: {type(err).__name__}: {err}"
            ) from None
    path = Path(url.removeprefix("journal://").removeprefix("journal:"))
    if not create and not path.exists():
        raise SweepError(f"storage {path} does not exist (no sweep has written there)")
    if path.is_dir():
        raise SweepError(f"storage {path} is a directory, not an Optuna journal file")
    if path.exists() and path.stat().st_size and not _looks_like_journal(path):
        raise SweepError(
            f"storage {path} is not an Optuna journal (its first line is not one of Optuna's "
            "JSON records); name a new file or an existing study's journal"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            repair_journal(path)
        except OSError as err:  # read-only, say: Optuna still reads up to a torn last line
            print(f"storage {path}: could not repair it: {err}", file=sys.stderr)
    return JournalStorage(SafeJournalBackend(str(path)))


class JournalLost(OSError):
    """The journal vanished or became unreadable under a running sweep (a storage error)."""

    @classmethod
    def deleted(cls, path: str | Path) -> JournalLost:
        return cls(f"journal {path} was deleted while the sweep ran")


class SafeJournalBackend(JournalFileBackend):
    """Optuna's journal file, written so that no record can be torn or orphaned.

    Optuna appends with `open(path, "ab")`: a journal deleted mid-sweep is silently
    recreated holding only the operations that follow (trial ids nobody created), and a
    write cut short (a full disk) leaves a partial line that the next append glues onto, so
    Optuna can no longer read the study. Here, under Optuna's own lock: the journal must
    still exist; a torn tail left by a killed writer is moved to `<journal>.torn` before
    writing; a failed write is cut back to the size it had, so the journal ends on a whole
    record. A read that meets a damaged record raises JournalLost instead of ValueError."""

    def append_logs(self, logs: list[dict]) -> None:
        from optuna.storages.journal._file import get_lock_file  # Optuna's lock, not a copy

        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
        path = Path(self._file_path)
        with get_lock_file(self._lock):
            if not path.exists():  # "ab", as Optuna opens it, would recreate a deleted journal
                raise JournalLost.deleted(path)
            with open(path, "r+b") as f:
                size = f.seek(0, os.SEEK_END)
                if size:
                    size = _cut_torn_tail(f, path, size)
                try:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:
                    f.truncate(size)  # frees what was written: the journal ends on a record
                    raise

    def read_logs(self, log_number_from: int) -> Iterator[dict]:
        try:
            yield from super().read_logs(log_number_from)
        except FileNotFoundError:
            raise JournalLost.deleted(self._file_path) from None
        except ValueError as err:  # a damaged record in the middle
            raise JournalLost(
                f"journal {self._file_path} has a damaged record ({err}); run the same command "
                "again: it sets the damaged line aside and keeps every complete record"
            ) from None


def _cut_torn_tail(f, path: Path, size: int) -> int:
    """A journal not ending in a newline ends in a write cut short (its writer was killed):
    move those bytes to <journal>.torn and cut them off. Returns the new size."""
    f.seek(max(0, size - 65536))
    tail = f.read()
    if tail.endswith(b"\n"):
        return size
    keep = tail.rfind(b"\n") + 1  # 0 when no newline in the window: cut the whole window
    start = size - len(tail) + keep
    with open(path.with_name(path.name + ".torn"), "ab") as torn:
        torn.write(tail[keep:] + b"\n")
    f.truncate(start)
    f.seek(start)
    return start


def repair_journal(path: Path) -> list[bytes]:
    """Set aside the lines of a journal Optuna cannot read, keeping every other record.

    A worker killed, or a disk filled, in the middle of an append leaves a torn last line;
    the next append is glued to it, and from then on Optuna cannot read the study at all
    (JSONDecodeError), completed trials included. Under Optuna's own journal lock, every
    line that is not a whole JSON record is moved, byte for byte, to `<journal>.torn` and the
    journal rewritten without it (a temporary file, then an atomic rename). Returns them."""
    from optuna.storages.journal import JournalFileSymlinkLock
    from optuna.storages.journal._file import get_lock_file  # Optuna's lock, not a copy

    data = path.read_bytes()
    if not data or (data.endswith(b"\n") and _all_records(data)):
        return []
    with get_lock_file(JournalFileSymlinkLock(str(path))):
        data = path.read_bytes()  # again, under the lock
        good, bad = [], []
        for line in data.splitlines(keepends=True):
            if line.endswith(b"\n") and _is_record(line):
                good.append(line)
                continue
            # a torn write with the next whole record glued on: keep the record
            cut = _glued_record(line)
            bad.append(line[:cut])
            if cut < len(line):
                good.append(line[cut:])
        if not bad:
            return []
        with open(path.with_name(path.name + ".torn"), "ab") as torn:
            torn.write(b"".join(x if x.endswith(b"\n") else x + b"\n" for x in bad))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(good))
        os.replace(tmp, path)
    print(
        f"storage {path}: set aside {len(bad)} unreadable line(s) (a write cut short) in "
        f"{path.name}.torn; every complete record is kept",
        file=sys.stderr,
    )
    return bad


def _glued_record(line: bytes) -> int:
    """Where a whole record glued after a torn one starts in `line`; len(line) if none."""
    if line.endswith(b"\n"):
        start = line.find(RECORD_START, 1)
        while start != -1:
            if _is_record(line[start:]):
                return start
            start = line.find(RECORD_START, start + 1)
    return len(line)


RECORD_START = b'{"op_code":'  # how Optuna writes every journal record


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _all_records(data: bytes) -> bool:
    return all(_is_record(line) for line in data.splitlines() if line.strip())


def _looks_like_journal(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline(65536)
        return isinstance(json.loads(first), dict) and "op_code" in json.loads(first)
    except (OSError, ValueError):
        return False


def check_postgres(url: str) -> None:
    """Fail fast, naming host, port and database, when PostgreSQL cannot be reached."""
    import sqlalchemy

    parts = urlsplit(url)
    where = (
        f"host {parts.hostname or 'localhost'}, port {parts.port or 5432}, "
        f"database {parts.path.lstrip('/') or '(default)'}"
    )
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as err:
        reason = str(getattr(err, "orig", err)).strip().splitlines()[0]
        raise SweepError(
            f"PostgreSQL storage {describe_url(url)} cannot be reached ({where}): {reason}"
        ) from None


@contextlib.contextmanager
def claim_lock(url: str, study: str) -> Iterator[None]:
    """Serialise 'pick a cell, create its trial' across every worker of a study.

    Journal and SQLite files: an flock beside the file (one machine or a shared filesystem).
    PostgreSQL: a session advisory lock, so workers on different machines agree.
    """
    if is_rdb(url) and urlsplit(url).scheme.startswith("postgres"):
        with _pg_advisory_lock(url, study):
            yield
        return
    if is_rdb(url):
        path = Path(urlsplit(url).path.lstrip("/") or "optuna.db").with_suffix(".claim.lock")
    else:
        path = Path(url.removeprefix("journal://").removeprefix("journal:") + ".claim.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _pg_advisory_lock(url: str, name: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock keyed by name: held by one connection at a time."""
    import sqlalchemy

    key = zlib.crc32(name.encode())
    with _engine(url).connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


_ENGINES: dict[str, object] = {}


def _engine(url: str):
    import sqlalchemy

    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(url, pool_pre_ping=True)
    return _ENGINES[url]


# --- liveness --------------------------------------------------------------------------------


def stop_signals() -> list[int]:
    """The signals that stop a launcher or a worker besides Ctrl-C: SIGTERM (a scheduler's,
    `kill`), and SIGHUP (the terminal closed) unless it is ignored, as under `nohup`, where
    the sweep must keep running."""
    hup = [] if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else [signal.SIGHUP]
    return [signal.SIGTERM, *hup]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (pid plus this is unique); None
    when it is gone, or a zombie (dead, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def hostname() -> str:
    # ALLCONV_HOST lets tests (and containers sharing a hostname) stand in for other machines
    return os.environ.get("ALLCONV_HOST") or socket.gethostname()


def owner_stamp() -> dict[str, object]:
    pid = os.getpid()
    return {
        "worker.host": hostname(),
        "worker.pid": pid,
        "worker.start": _start_time(pid),
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
        if _start_time(pid) != attrs.get("worker.start"):
            return f"worker pid {pid} on {attrs['worker.host']} is gone"
        return None
    age = now - float(attrs.get("worker.heartbeat", 0))
    if age > GRACE_S:
        return f"no heartbeat from {attrs.get('worker.host')} for {age:.0f} s"
    return None


# --- Optuna private API, in one place ------------------------------------------------------
# Optuna 5.0 gives no public way to reach the storage behind a live study, or a trial's storage
# id, and both are needed: to fail a trial that no worker will finish (a dead worker's RUNNING
# trial, a WAITING one left by a worker that died between enqueue and ask) and to stamp a
# heartbeat on the journal backend, which has none of its own. Optuna's integrations use the
# same attributes; if a release renames them, only these functions change.


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def study_id(study: optuna.Study) -> int:
    return study._study_id  # optuna-dashboard's URLs name studies by it


def fail_trial(
    study: optuna.Study,
    trial: FrozenTrial | optuna.Trial,
    message: str | None = None,
    *,
    interrupted: bool = False,
) -> bool:
    """Mark a trial FAIL (with a message; `interrupted` when a signal or a dead worker ended
    it, so that it is not held against its cell); False if it finished in the meantime."""
    storage = storage_of(study)
    if message is not None:
        storage.set_trial_user_attr(trial_id(trial), "error_message", message)
    if interrupted:
        storage.set_trial_user_attr(trial_id(trial), "interrupted", True)
    try:
        storage.set_trial_state_values(trial_id(trial), TrialState.FAIL)
    except RuntimeError:
        return False
    return True


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
