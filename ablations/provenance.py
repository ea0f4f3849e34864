"""Where a study's numbers came from: the code's commit, the packages' versions, and one
record per `ablate sweep` run (its command line, host, times and the sweep file as read), kept
in the study so that the report, on any machine and years later, can say how it was made.

Each launch is one study attribute of its own (`launch:<host>:<pid>:<start>`), so launchers on
several machines never overwrite each other's. Imports neither torch nor Lightning.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna

from ablations.liveness import hostname
from ablations.storage import describe_url

__all__ = ["LAUNCH_PREFIX", "PACKAGES", "end_launch", "git_commit", "launches", "record_launch"]
__all__ += ["versions"]

LAUNCH_PREFIX = "launch:"
# the distributions whose versions decide a result, as the report lists them
PACKAGES = ("torch", "lightning", "optuna", "wandb", "numpy", "allconv-ablations")


@functools.cache  # once per process: a worker's trials all run the code it started with
def git_commit() -> str | None:
    """The checkout's commit, with `-dirty` when tracked files have changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=here,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def head_commit() -> str | None:
    """The checkout's commit read from `.git` itself (no process started: the launcher's
    record; the trials' records say `-dirty` when the tree had changes)."""
    for folder in Path(__file__).resolve().parents:
        git = folder / ".git"
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref: "):
                return head
            ref = head[5:]
            if (git / ref).is_file():
                return (git / ref).read_text().strip()
            for line in (git / "packed-refs").read_text().splitlines():
                if line.endswith(f" {ref}"):
                    return line.split()[0]
        except OSError:
            return None
        return None
    return None


def versions() -> dict[str, str | None]:
    """Python's and each of PACKAGES' installed version (None when not installed), read from
    the installed metadata: nothing is imported."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def record_launch(study: optuna.Study, sweep_text: str, started: float) -> str:
    """Store this `ablate sweep` run with the study; returns its attribute's name. The command
    line is stored with any storage URL's password masked."""
    host = hostname()
    key = f"{LAUNCH_PREFIX}{host}:{os.getpid()}:{started:.0f}"
    study.set_user_attr(
        key,
        {
            "argv": [describe_url(a) for a in ["ablate", *sys.argv[1:]]],
            "cwd": str(Path.cwd()),
            "host": host,
            "platform": " ".join(os.uname()[i] for i in (0, 2, 4)),  # no process started
            "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
            "git_commit": head_commit(),
            "versions": versions(),
            "sweep_file": sweep_text,
        },
    )
    return key


def end_launch(study: optuna.Study, key: str, exit_code: int) -> None:
    """The launch's end time and exit status, added to its record; nothing when the storage
    is gone or failing (the sweep has said why already, and its exit status stands)."""
    try:
        entry = dict(study.user_attrs.get(key) or {})
        entry["ended"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        entry["exit_code"] = int(exit_code)
        study.set_user_attr(key, entry)
    except Exception:  # noqa: BLE001 (a record of the run, never a reason for it to fail)
        pass


def launches(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's recorded launches, oldest first (none for a study made before they were)."""
    found = [v for k, v in study.user_attrs.items() if k.startswith(LAUNCH_PREFIX)]
    return sorted(found, key=lambda v: v.get("started") or "")
