"""One sweep trial inside a worker: its parameters drawn, its run trained through `run.train`,
its record stored in the study and the trial told, whatever stops it on the way.

A stop signal (Ctrl-C, SIGTERM; Lightning turns one during a fit into SystemExit) marks the
trial interrupted, which is not held against its cell, and stops the worker. Once the fit has
returned, stops wait until the record is stored (`process.Stops`): a finished run is never
lost. A full or read-only disk interrupts the trial and stops the worker too.
"""

from __future__ import annotations

import contextlib
import math
import signal
import traceback
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from ablations import run, wandb_log
from ablations.liveness import Heartbeat
from ablations.process import Stops, WorkerStatus, machine_fault
from ablations.record import Outcome, TrialRecord, store
from ablations.settings import resolve
from ablations.storage import fail_trial, storage_of, trial_id
from ablations.study import suggest
from ablations.sweep_file import Sweep


class StatusFile(WorkerStatus, Callback):
    """The worker's status file, kept up to date by the fit: epoch, validation error, testing."""

    def on_test_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.write(state="testing")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # under DDP every rank runs this callback; two writers renaming one temporary file
        # failed a trial (FileNotFoundError), and rank 0's line is the trial's line anyway
        if not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val/error")
        self.write(
            epoch=trainer.current_epoch + 1, val_error=None if val is None else round(float(val), 2)
        )


class Pruning(PyTorchLightningPruningCallback, run.Stopper):
    """Optuna's Lightning pruning callback, stopping the fit instead of raising, so the
    trial keeps its curves, timings and parameters like any other."""

    def on_validation_end(self, trainer, pl_module) -> None:
        try:
            super().on_validation_end(trainer, pl_module)
        except optuna.TrialPruned as err:
            self.stop_state, self.stop_message = Outcome.PRUNED, str(err)
            trainer.should_stop = True


class HoldSignalsAfterFit(Callback):
    """From the end of the fit, a stop waits until the trial is recorded: a run that trained
    to the end is tested, written and told to the study, then the worker stops. (The worker
    itself holds from when `run.train`'s fit returns: under DDP these hooks run in the
    spawned ranks, not in the worker.)"""

    def on_fit_end(self, trainer, pl_module) -> None:
        Stops.held = True

    def on_test_start(self, trainer, pl_module) -> None:
        # trainer.test installs Lightning's SIGTERM handler again, in front of ours: it sets
        # a flag on which the evaluation loop ends the pass (SIGTERMException), and a trained
        # run was then interrupted. Ours alone handles SIGTERM through the test; Lightning
        # restores it at teardown anyway. A test pass follows only a fit that completed, so
        # each spawned DDP rank (a scheduler's stop reaches every process of the job) holds
        # its stops too, and the pass ends on every rank.
        stops = [signal.SIGTERM]
        if trainer.world_size > 1:
            Stops.held = True
            stops.append(signal.SIGINT)
        if Stops.held:
            for signum in stops:
                signal.signal(signum, Stops.handler)
            lightning_took_a_sigterm_of_ours(trainer)


def lightning_took_a_sigterm_of_ours(trainer) -> None:
    """A SIGTERM between trainer.test's handler and on_test_start reached Lightning too, and
    set the flag its evaluation loop checks; ours holds it, so Lightning's is cleared. Private
    API (Lightning 2.6's _SignalConnector), the one use in this project."""
    if Stops.pending is not None or trainer.world_size > 1:
        # a spawned rank: a SIGTERM before this hook reached Lightning's handler alone
        trainer._signal_connector.received_sigterm = False


def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    sweep: Sweep,
    *,
    runs_dir: Path,
    wandb_mode: str,
    status: StatusFile,
    devices: int = 1,
    ddp_port: int | None = None,
) -> Outcome:
    """Train one trial and record it in the study; returns its outcome."""
    with Heartbeat(storage_of(study), trial_id(trial)):
        try:
            outcome = _train_and_record(
                study, trial, sweep, runs_dir=runs_dir, wandb_mode=wandb_mode, status=status,
                devices=devices, ddp_port=ddp_port,
            )  # fmt: skip
        except (KeyboardInterrupt, SystemExit):
            with contextlib.suppress(Exception):
                fail_trial(study, trial, "interrupted by a signal", interrupted=True)
                status.write(state=Outcome.INTERRUPTED)
            raise
        except OSError as err:  # the machine's fault (disk full, folder read-only), not the cell's
            with contextlib.suppress(Exception):
                fail_trial(study, trial, f"{type(err).__name__}: {err}", interrupted=True)
                status.write(state=Outcome.INTERRUPTED)
            raise
        finally:
            Stops.held = False
    Stops.raise_pending()  # a stop that waited for the record: now the worker stops
    return outcome


def _train_and_record(
    study: optuna.Study,
    trial: optuna.Trial,
    sweep: Sweep,
    *,
    runs_dir: Path,
    wandb_mode: str,
    status: StatusFile,
    devices: int,
    ddp_port: int | None,
) -> Outcome:
    try:
        params = suggest(trial, sweep)
        settings = resolve({**sweep.base, **params})
        prepared = run.prepare(settings)
    except Exception as err:
        record = TrialRecord(Outcome.FAILED, error_message=f"{type(err).__name__}: {err}")
        with Stops.held_until_recorded():
            return _record(study, trial, sweep, record, None, status)
    flat = prepared.flat
    trial.set_user_attr("settings", dict(flat))  # a trial stopped in its fit keeps them too
    status.write(
        trial=trial.number,
        cell=flat["model.name"] + _cell_suffix(params),
        epoch=0,
        epochs=settings["train.epochs"],
        val_error=None,
        state=Outcome.RUNNING,
    )
    # a folder left by a study whose journal was lost is kept: this trial gets `-2`
    run_dir = run.free_dir(runs_dir / "trials", f"{trial.number:04d}-{run.run_name(flat)}")
    logger = wandb_log.trial_logger(
        wandb_mode,
        study=study.study_name,
        trial=trial.number,
        flat=flat,
        # tags for categorical values only: a continuous one would make a tag per trial
        tagged=[k for k in sweep.swept if sweep.params[k].values is not None],
        save_dir=run_dir,
        project=sweep.project,
        entity=sweep.entity,
    )
    # the hold first: a stop that comes as the status says "testing" is already held
    callbacks: list = [HoldSignalsAfterFit(), status]
    if sweep.hyperband is not None:
        callbacks.append(Pruning(trial, monitor=sweep.metric))
    try:
        record = run.train(
            settings,
            run_dir,
            loggers=[logger] if logger else [],
            callbacks=callbacks,
            progress=False,
            prepared=prepared,
            devices=devices,
            ddp_port=ddp_port,
            after_fit=Stops.hold,
        )
    except Exception as err:
        fault = machine_fault(err)
        if fault is not None:
            raise fault from err
        record = TrialRecord(
            Outcome.FAILED, settings=flat, error_message=f"{type(err).__name__}: {err}"
        )
        traceback.print_exc()
    with Stops.held_until_recorded():
        return _record(study, trial, sweep, record, logger, status)


def _record(
    study: optuna.Study,
    trial: optuna.Trial,
    sweep: Sweep,
    record: TrialRecord,
    logger: Any,
    status: StatusFile,
) -> Outcome:
    """The record into the trial, its W&B run finished, and the trial told to the study."""
    value = record.get(sweep.metric)
    if record.outcome == Outcome.COMPLETE and (value is None or not math.isfinite(value)):
        record = record.failed(f"{sweep.metric} is not finite: {value}")
    run_id = wandb_log.finish(logger, record.fields())
    record = record.with_wandb_run(run_id)
    store(trial, record)
    report_curve(trial, sweep, record.history)
    if record.outcome == Outcome.COMPLETE:
        study.tell(trial, value)
    elif record.outcome == Outcome.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
    else:  # diverged is a result, kept as FAIL with state=diverged and not retried
        study.tell(trial, state=TrialState.FAIL)
    status.write(state=record.outcome)
    return record.outcome


def report_curve(trial: optuna.Trial, sweep: Sweep, history: list[dict[str, Any]]) -> None:
    """Each epoch's validation metric as Optuna intermediate values, for every method: the
    dashboard's learning curves. Under hyperband the pruner has reported them already."""
    if sweep.hyperband is not None:
        return
    key = sweep.metric if sweep.metric in ("val/error", "val/loss", "train/loss") else "val/error"
    for row in history:
        value = row.get(key)
        if value is not None and math.isfinite(value):
            trial.report(float(value), int(row["epoch"]))


def _cell_suffix(params: dict[str, Any]) -> str:
    shown = [f"{k.split('.')[-1]}={v}" for k, v in params.items() if k not in ("model.variant",)]
    return (" " + " ".join(shown)) if shown else ""
