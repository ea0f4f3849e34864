"""Resumable checkpoints: written atomically at epoch ends by `EpochCheckpoints`, carrying
every rank's random streams; read back by `find`, which checks them against the cell and the
network; and, once a trial completes, reduced to `last.ckpt` by `finish`. What a checkpoint
holds and when it is written: ablations/resume.py."""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ablations.resume import (
    CHECKPOINTS,
    KEEP,
    LAST,
    CheckpointPolicy,
    Lease,
    ResumeError,
    candidates,
    epoch_checkpoints,
)
from ablations.settings import OPERATIONAL


def rng_state() -> dict[str, Any]:
    """This process's random streams: torch's (CPU and CUDA), NumPy's and Python's, as
    tensors and plain numbers, so `torch.load(weights_only=True)` still reads the file."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },  # fmt: skip
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },  # fmt: skip
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))


def cell_settings(flat: dict[str, Any]) -> dict[str, Any]:
    """What makes a run the same experiment: its settings less the operational ones."""
    return {k: v for k, v in flat.items() if k not in OPERATIONAL and k != "data.files"}


class EpochCheckpoints(Callback):
    """Writes the resumable checkpoints (module docstring), and stops the fit, writing
    nothing more, once the run folder has another owner."""

    def __init__(
        self, run_dir: Path, flat: dict[str, Any], policy: CheckpointPolicy, lease: Lease | None
    ) -> None:
        self.dir = run_dir / CHECKPOINTS
        self.cell = cell_settings(flat)
        self.policy = policy
        self.lease = lease
        self.taken_over = False
        self._saved_at = time.monotonic()
        self._restore: list[dict[str, Any]] | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.lease is not None and not _agree(trainer, self.lease.held()):
            self.taken_over = trainer.should_stop = True
            return
        epoch = trainer.current_epoch + 1  # epochs complete
        minutes = (time.monotonic() - self._saved_at) / 60
        due = (
            epoch % self.policy.every_epochs == 0
            or epoch >= trainer.max_epochs
            or (self.policy.every_minutes is not None and minutes >= self.policy.every_minutes)
        )
        if _agree(trainer, due):  # every rank saves or none: saving is collective
            self.save(trainer, self.dir / f"epoch-{epoch:04d}.ckpt")
            self._saved_at = time.monotonic()

    def save(self, trainer, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            for old in epoch_checkpoints(self.dir)[KEEP:]:
                old.unlink(missing_ok=True)
        trainer.strategy.barrier("checkpoint")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = rng_state()
        if trainer.world_size > 1:  # rank 0 writes the file: it carries every rank's streams
            states: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["allconv"] = {"cell": self.cell, "rng": states}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._restore = checkpoint.get("allconv", {}).get("rng")

    def on_fit_start(self, trainer, pl_module) -> None:
        # the modules and callbacks are restored by now, and nothing before the first batch
        # draws from these streams (the loader has its own, RankSeeds leaves a resumed fit
        # alone); a fit with no epoch left goes straight to the test pass, whose dropout
        # draws from them too
        if self._restore is not None:
            if trainer.global_rank < len(self._restore):
                set_rng_state(self._restore[trainer.global_rank])
            self._restore = None


def _agree(trainer, decision: bool) -> bool:
    """Rank 0's decision, on every rank."""
    if trainer.world_size == 1:
        return decision
    return bool(trainer.strategy.broadcast(decision, src=0))


@dataclass(frozen=True)
class Resume:
    """The checkpoint a trial continues from."""

    path: Path
    epoch: int  # epochs complete in it
    history: list[dict[str, Any]]


def newest_readable(run_dir: Path, *, say: bool = True) -> tuple[Path, dict] | None:
    """The newest checkpoint of `run_dir` that reads, with its contents; a torn or unreadable
    one falls back to the one before, none to None (each with one printed line if `say`)."""
    found = candidates(run_dir)
    for path in found:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            ckpt["allconv"]["cell"], ckpt["state_dict"]  # noqa: B018  (what a resume needs)
        except Exception as err:
            if say:
                print(f"{path}: unreadable ({type(err).__name__}), trying the one before",
                      file=sys.stderr)  # fmt: skip
            continue
        return path, ckpt
    if found and say:
        print(
            f"{run_dir}: no checkpoint reads; the trial starts again from epoch 0", file=sys.stderr
        )
    return None


def find(run_dir: Path, flat: dict[str, Any], module: torch.nn.Module) -> Resume | None:
    """The checkpoint to resume from (`newest_readable`), checked against this cell and this
    code's network; None: start from epoch 0. Raises ResumeError for another cell's
    checkpoint or one whose network does not load here."""
    got = newest_readable(run_dir)
    if got is None:
        return None
    path, ckpt = got
    check(path, ckpt["allconv"]["cell"], cell_settings(flat), ckpt["state_dict"],
          module.state_dict())  # fmt: skip
    recorder = next((v for k, v in ckpt.get("callbacks", {}).items() if "EpochRecorder" in k), {})
    return Resume(path, int(ckpt["epoch"]) + 1, list(recorder.get("history", [])))


def check_folder(run_dir: Path, flat: dict[str, Any]) -> None:
    """What `find` refuses, checked without the data (the launcher, before any worker
    starts): the newest readable checkpoint against the trial's recorded settings, and its
    network against this code's build of the network it describes."""
    from lightning_modules.module import AllConvModule

    got = newest_readable(run_dir, say=False)  # the worker's `find` says it, and falls back
    if got is None:
        return
    path, ckpt = got
    try:
        expected = AllConvModule(**ckpt["hyper_parameters"]).state_dict()
    except Exception as err:
        raise ResumeError(
            f"{path} does not load into this code's network ({type(err).__name__}: "
            f"{err}): it was written by another version; run that version to resume it, "
            "or move the run folder away"
        ) from None
    check(path, ckpt["allconv"]["cell"], cell_settings(flat), ckpt["state_dict"], expected)


def check(
    path: Path,
    saved: dict[str, Any],
    cell: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
) -> None:
    if saved != cell:
        differ = sorted(k for k in saved.keys() | cell.keys() if saved.get(k) != cell.get(k))
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {cell.get(k)!r} here" for k in differ[:3])
        raise ResumeError(
            f"{path} is of another cell ({shown}); move its run folder away to start this "
            "trial from epoch 0"
        )
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    shapes = [
        k for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or shapes:
        what = (
            f"missing {missing[0]}" if missing
            else f"unexpected {unexpected[0]}" if unexpected
            else f"{shapes[0]} is {tuple(state_dict[shapes[0]].shape)} there, "
            f"{tuple(expected[shapes[0]].shape)} here"
        )  # fmt: skip
        raise ResumeError(
            f"{path} does not load into this code's network ({what}): it was written by "
            "another version; run that version to resume it, or move the run folder away"
        )


def finish(run_dir: Path, policy: CheckpointPolicy) -> None:
    """A completed trial: its newest checkpoint becomes `last.ckpt`; the rest go unless kept."""
    folder = run_dir / CHECKPOINTS
    epochs = epoch_checkpoints(folder)
    if not epochs:
        return
    if policy.keep_all:  # a copy, written as the checkpoints are: never a half file
        tmp = folder / f".{LAST}.tmp"
        shutil.copyfile(epochs[0], tmp)
        os.replace(tmp, folder / LAST)
        return
    os.replace(epochs[0], folder / LAST)
    for old in epochs[1:]:
        old.unlink(missing_ok=True)
