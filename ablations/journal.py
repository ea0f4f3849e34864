"""Optuna's journal file, made safe: no record torn or orphaned, a torn tail set aside."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from ablations.files import atomic_write
from ablations.sweep_file import SweepError


def open_journal(url: str, *, create: bool) -> JournalStorage:
    """The journal at a path (or `journal:PATH`), checked and repaired before it is read."""
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
        atomic_write(path, b"".join(good))
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
