"""One trial as a typed record: its cell and settings, how it ended, what it measured, how long
it took and where it ran. Made by `run.train` (or by the worker when a trial cannot start),
stored in the study by `store`, read back by `TrialRecord.of`; status, export, the CLI and
W&B read nothing else.

In the study the record is the trial's user attributes, one per field under the name the
rest of the project uses (`val/error`, `fit_seconds`, ...), so optuna-dashboard shows them and
a study written before this module existed reads the same. The outcome is one field: Optuna's
own state says only whether a trial finished, and `state` says how. The per-epoch history is
one attribute, `curves` (a list per metric, `CURVE_KEYS`), what the report draws; studies
written before it have none.

Imports neither torch nor Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from optuna.trial import FrozenTrial, TrialState

__all__ = ["Outcome", "Metrics", "Timings", "Provenance", "TrialRecord", "store", "curves"]
__all__ += ["COLUMNS", "CURVES_ATTR", "CURVE_KEYS"]


class Outcome(StrEnum):
    """How a trial ended (or that it has not)."""

    COMPLETE = "complete"
    PRUNED = "pruned"  # stopped early by the sweep's pruner: a result
    DIVERGED = "diverged"  # the loss went non-finite: a result, never retried
    FAILED = "failed"  # raised: counts against its cell (retried up to study.MAX_ATTEMPTS)
    INTERRUPTED = "interrupted"  # a signal or a dead worker ended it: says nothing of its cell
    RUNNING = "running"
    WAITING = "waiting"  # enqueued, not yet asked for

    @property
    def done(self) -> bool:
        """A result of its cell, which is not run again."""
        return self in DONE


DONE = (Outcome.COMPLETE, Outcome.PRUNED, Outcome.DIVERGED)


def _key(name: str) -> Any:
    """A field stored in the study under another name than its Python one."""
    return field(default=None, metadata={"key": name})


@dataclass(frozen=True)
class Metrics:
    """Errors in percent, as the paper reports them; None where not measured."""

    val_error: float | None = _key("val/error")  # at the last epoch
    test_error: float | None = _key("test/error")
    test_error_dropout: float | None = _key("test/error_dropout")  # dropout kept on
    train_loss: float | None = _key("train/loss")
    val_loss: float | None = _key("val/loss")
    best_val_error: float | None = _key("best_val/error")
    best_epoch: int | None = None
    epochs_run: int | None = None
    params: int | None = None
    macs: int | None = None


@dataclass(frozen=True)
class Timings:
    fit_seconds: float | None = None
    images_per_second: float | None = None  # training batches only, every rank's images
    first_epoch_seconds: float | None = None  # its training batches (compilation included)
    segments: int | None = None  # fits it took: 1, plus one per resume from a checkpoint
    resumed_from_epoch: int | None = None  # epochs complete in the checkpoint last resumed


@dataclass(frozen=True)
class Provenance:
    device: str | None = None
    precision: str | None = None  # the resolved one (train.precision=auto says which)
    git_commit: str | None = None  # with `-dirty` when the tree had changes
    run_dir: str | None = None
    data_files: list[str] | None = _key("data.files")
    wandb_run_id: str | None = None
    world_size: int | None = None  # ranks of the trial (--devices-per-trial)
    rank_batch_size: int | None = None  # each rank's share of train.batch_size


@dataclass(frozen=True)
class TrialRecord:
    outcome: Outcome
    settings: dict[str, Any] = field(default_factory=dict)  # settings.recorded: with model.name
    cell: str | None = None  # sweep_file.cell_id of its grid cell
    metrics: Metrics = field(default_factory=Metrics)
    timings: Timings = field(default_factory=Timings)
    provenance: Provenance = field(default_factory=Provenance)
    error_message: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch, as `curves`

    @property
    def model_name(self) -> str | None:
        return self.settings.get("model.name")

    def get(self, key: str) -> Any:
        """A field by its project name (`test/error`, `fit_seconds`, `state`), as measured."""
        return self.fields(finite=False).get(key)

    def fields(self, *, finite: bool = True) -> dict[str, Any]:
        """Every stored field by its project name; non-finite numbers as None unless asked."""
        out: dict[str, Any] = {"state": self.outcome.value}
        for part in (self.metrics, self.timings, self.provenance):
            for f in fields(part):
                value = getattr(part, f.name)
                out[f.metadata.get("key", f.name)] = _finite(value) if finite else value
        out["error_message"] = self.error_message
        out["model.name"] = self.model_name
        return out

    def failed(self, message: str) -> TrialRecord:
        """This record turned into a failure (a complete run whose metric is not finite)."""
        return replace(self, outcome=Outcome.FAILED, error_message=message)

    def with_wandb_run(self, run_id: str | None) -> TrialRecord:
        return replace(self, provenance=replace(self.provenance, wandb_run_id=run_id))

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        """The record a trial holds in the study."""
        attrs = trial.user_attrs
        return cls(
            outcome=_outcome(trial),
            settings=dict(attrs.get("settings") or {}),
            cell=attrs.get("cell"),
            metrics=_part(Metrics, attrs),
            timings=_part(Timings, attrs),
            provenance=_part(Provenance, attrs),
            error_message=attrs.get("error_message"),
            history=_rows(attrs.get(CURVES_ATTR)),
        )


# the measurements of the trials dataframe, in its column order
COLUMNS = (
    "params",
    "macs",
    "val/error",
    "test/error",
    "test/error_dropout",
    "best_epoch",
    "epochs_run",
    "fit_seconds",
    "segments",
    "resumed_from_epoch",
    "images_per_second",
    "precision",
    "device",
    "wandb_run_id",
    "git_commit",
)


CURVES_ATTR = "curves"
# what a trial keeps of each epoch: the learning curves and the time they took
CURVE_KEYS = ("epoch", "train/loss", "train/error", "val/loss", "val/error", "train_seconds")


def store(trial, record: TrialRecord) -> None:
    """Write the record into a running trial's user attributes (before it is told)."""
    if record.settings:
        trial.set_user_attr("settings", dict(record.settings))
    for key, value in record.fields().items():
        if value is not None and key != "model.name":
            trial.set_user_attr(key, value)
    if record.history:
        trial.set_user_attr(CURVES_ATTR, curves(record.history))


def curves(history: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """The history as one list per key (JSON: a non-finite value, a diverged epoch, as null),
    6 significant digits: what a figure needs, a few kB per hundred epochs."""
    keys = [k for k in CURVE_KEYS if any(k in row for row in history)]
    return {
        k: [_short(row.get(k)) if k != "epoch" else int(row["epoch"]) for row in history]
        for k in keys
    }


def _rows(stored: dict[str, list] | None) -> list[dict[str, float]]:
    if not stored or "epoch" not in stored:
        return []
    return [
        {k: v[i] for k, v in stored.items() if i < len(v) and v[i] is not None}
        for i in range(len(stored["epoch"]))
    ]


def _short(v: Any) -> float | None:
    if not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(f"{v:.6g}")


def _part(cls: type, attrs: dict[str, Any]) -> Any:
    return cls(**{f.name: attrs.get(f.metadata.get("key", f.name)) for f in fields(cls)})


def _outcome(trial: FrozenTrial) -> Outcome:
    """Optuna's state, and for a finished trial what `state` says of how it ended."""
    if trial.state == TrialState.RUNNING:
        return Outcome.RUNNING
    if trial.state == TrialState.WAITING:
        return Outcome.WAITING
    stored = trial.user_attrs.get("state")
    if stored == Outcome.DIVERGED:
        return Outcome.DIVERGED
    if trial.state == TrialState.COMPLETE:
        return Outcome.COMPLETE
    if trial.state == TrialState.PRUNED:
        return Outcome.PRUNED
    # FAIL: interrupted (studies written before `state` said so carry an `interrupted` flag)
    if stored == Outcome.INTERRUPTED or trial.user_attrs.get("interrupted"):
        return Outcome.INTERRUPTED
    return Outcome.FAILED


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v
