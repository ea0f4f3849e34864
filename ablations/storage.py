"""Where a study lives (a journal file, or any Optuna RDB URL), the lock under which workers
claim cells, and the only uses of Optuna's private API."""

from __future__ import annotations

import contextlib
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from filelock import FileLock
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from ablations import process
from ablations.journal import open_journal
from ablations.record import Outcome
from ablations.sweep_file import SweepError

RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")

optuna.logging.set_verbosity(optuna.logging.WARNING)


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
                    heartbeat_interval=int(process.HEARTBEAT_S),
                    grace_period=int(process.GRACE_S),
                    engine_kwargs={"pool_pre_ping": True},
                )
        except Exception as err:
            raise SweepError(
                f"storage {describe_url(url)} cannot be used: {type(err).__name__}: {err}"
            ) from None
    return open_journal(url, create=create)


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

    Journal and SQLite files: a file lock beside the file (filelock: flock on Unix, msvcrt on
    Windows; one machine or a shared filesystem).
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
    with FileLock(path, thread_local=False):
        yield


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
    outcome = Outcome.INTERRUPTED if interrupted else Outcome.FAILED
    try:  # the record's outcome (record.py), then Optuna's state
        if message is not None:
            storage.set_trial_user_attr(trial_id(trial), "error_message", message)
        storage.set_trial_user_attr(trial_id(trial), "state", outcome.value)
        storage.set_trial_state_values(trial_id(trial), TrialState.FAIL)
    except RuntimeError:  # finished in the meantime: its own record stands
        return False
    return True
