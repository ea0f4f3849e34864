"""A trial continued from its last epoch checkpoint: how checkpoints are written, which one a
resumed trial loads, who owns a run folder, and which interrupted trial a worker continues.

A trial writes `checkpoints/epoch-NNNN.ckpt` at the end of an epoch (every epoch by default;
every N epochs or M minutes as the study's `CheckpointPolicy` says, and always the last),
atomically, keeping the two newest. The checkpoint holds what Lightning saves (weights,
optimizer momentum, scheduler position, loop counters, callback states: the epoch history and
the fit time so far) and, from `EpochCheckpoints`, every rank's random streams (the data order
and augmentation are drawn from seeds per epoch, `datamodules/loader.py`, so dropout's stream
is the one that must be carried). A trial that completes keeps its last checkpoint as
`checkpoints/last.ckpt` (what `ablate visualize` reads) unless the study keeps all of them.

This module is what the launcher and the claim need (no torch); `ablations/checkpoints.py`
writes and reads the checkpoints.

A run folder has one owner at a time, its `owner` file: the trial training in it. A trial
interrupted in any way (a signal, a dead worker seen by the heartbeat, a full disk) leaves
its folder and checkpoints; the next worker to claim its cell enqueues a new trial with the
same parameters that names it in `resumes`, takes the folder, and fits from the newest
checkpoint that reads. A worker whose trial was taken over this way (its lease presumed dead)
sees another owner, stops writing and records nothing.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from ablations.record import Outcome
from ablations.settings import SettingsError

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
KEEP = 2  # a torn newest checkpoint falls back to the one before
POLICY_ATTR = "checkpoint.policy"
EPOCH_FILE = re.compile(r"epoch-(\d+)\.ckpt$")


class ResumeError(SettingsError):
    """A checkpoint that must not be continued: another cell's, or a network this code
    cannot load. Bad input: the worker stops with exit 2 and touches nothing."""


class TakenOver(Exception):
    """This process's trial is now another worker's: it records nothing."""


@dataclass(frozen=True)
class CheckpointPolicy:
    """How often a trial writes a checkpoint, and whether a completed trial keeps them all.
    Recorded with the study (`POLICY_ATTR`), so every worker of it, and every later run of
    the same command, writes the same."""

    every_epochs: int = 1
    every_minutes: float | None = None  # also when this long has passed since the last one
    keep_all: bool = False

    def __post_init__(self) -> None:
        if self.every_epochs < 1:
            raise SettingsError(f"--checkpoint-every {self.every_epochs}: give at least 1")
        if self.every_minutes is not None and self.every_minutes <= 0:
            raise SettingsError(f"--checkpoint-minutes {self.every_minutes}: give more than 0")

    @classmethod
    def of(cls, study: optuna.Study) -> CheckpointPolicy:
        return cls(**study.user_attrs.get(POLICY_ATTR, {}))

    def record(self, study: optuna.Study) -> None:
        study.set_user_attr(POLICY_ATTR, asdict(self))


EVERY_EPOCH = CheckpointPolicy()


@dataclass(frozen=True)
class Lease:
    """A run folder and the token of the trial that owns it."""

    run_dir: Path
    token: str

    def take(self) -> None:
        from ablations.files import atomic_write

        atomic_write(self.run_dir / "owner", self.token + "\n")

    def owner(self) -> str | None:
        try:
            return (self.run_dir / "owner").read_text().strip() or None
        except OSError:
            return None

    def held(self) -> bool:
        return self.owner() in (None, self.token)


def epoch_checkpoints(folder: Path) -> list[Path]:
    """A run's epoch checkpoints, newest first."""
    found = [
        (int(m.group(1)), p)
        for p in folder.glob("epoch-*.ckpt")
        if (m := EPOCH_FILE.search(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def epochs_in(path: Path, epochs: int) -> int:
    """Epochs complete in a checkpoint, from its name (`last.ckpt`: all `epochs`)."""
    if path.name == LAST:
        return epochs
    m = EPOCH_FILE.search(path.name)
    return int(m.group(1)) if m else 0


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoints to resume from, newest first: a completed fit's `last.ckpt`, then epochs."""
    folder = run_dir / CHECKPOINTS
    last = [folder / LAST] if (folder / LAST).is_file() else []
    return last + epoch_checkpoints(folder)


def predecessor(trials: list[FrozenTrial], others: list[FrozenTrial]) -> FrozenTrial | None:
    """The interrupted trial among `trials` that a new trial continues: the newest one whose
    run folder holds a checkpoint and that no trial of `others` continues already."""
    from ablations.study import trial_state

    taken = {t.user_attrs.get("resumes") for t in others}
    for t in sorted(trials, key=lambda t: t.number, reverse=True):
        if trial_state(t) != Outcome.INTERRUPTED or t.number in taken:
            continue
        run_dir = t.user_attrs.get("run_dir")
        if run_dir and candidates(Path(run_dir)):
            return t
    return None


def successor_attrs(t: FrozenTrial) -> dict[str, Any]:
    """What a trial continuing `t` inherits: its folder, its W&B run, its segments."""
    attrs = {"resumes": t.number, "run_dir": t.user_attrs["run_dir"]}
    if t.user_attrs.get("wandb_run_id"):
        attrs["wandb_run_id"] = t.user_attrs["wandb_run_id"]
    return attrs
