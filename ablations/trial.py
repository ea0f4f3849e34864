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
import sys
import traceback
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from ablations import checkpoints, resume, run, wandb_log
from ablations.liveness import Heartbeat
from ablations.process import Stops, WorkerStatus, machine_fault
from ablations.record import Outcome, TrialRecord, store
from ablations.resume import EVERY_EPOCH, CheckpointPolicy, Lease, TakenOver
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
    policy: CheckpointPolicy = EVERY_EPOCH,
) -> Outcome:
    """Train one trial (continuing the one it resumes) and record it in the study; returns
    its outcome."""
    with Heartbeat(storage_of(study), trial_id(trial)):
        try:
            outcome = _train_and_record(
                study, trial, sweep, runs_dir=runs_dir, wandb_mode=wandb_mode, status=status,
                devices=devices, ddp_port=ddp_port, policy=policy,
            )  # fmt: skip
        except (KeyboardInterrupt, SystemExit):
            with contextlib.suppress(Exception):
                fail_trial(study, trial, "interrupted by a signal", interrupted=True)
                status.write(state=Outcome.INTERRUPTED)
            raise
        except resume.ResumeError as err:  # bad input: the worker stops, exit 2
            with contextlib.suppress(Exception):
                fail_trial(study, trial, str(err), interrupted=True)
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
    policy: CheckpointPolicy,
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
    inherited = trial.user_attrs  # from the interrupted trial it continues, if any
    if "resumes" in inherited:  # its folder, its newest checkpoint that reads
        run_dir = Path(inherited["run_dir"])
        found = checkpoints.find(run_dir, flat, prepared.module)
    else:  # a folder left by a study whose journal was lost is kept: this trial gets `-2`
        run_dir = run.free_dir(runs_dir / "trials", f"{trial.number:04d}-{run.run_name(flat)}")
        found = None
    lease = Lease(run_dir, str(trial.number))
    lease.take()
    trial.set_user_attr("run_dir", str(run_dir))  # where a trial continuing this one looks
    if found is not None:
        print(
            f"worker {status.worker}: trial {trial.number} continues trial "
            f"{inherited['resumes']} from epoch {found.epoch} ({found.path.name})",
            file=sys.stderr,
        )
        if sweep.hyperband is not None:  # the pruner compares what it has seen of each trial
            report_curve(trial, sweep, found.history, force=True)
    run_id = None
    if wandb_mode != "disabled":  # one W&B run per trial, whatever its segments
        run_id = inherited.get("wandb_run_id") or wandb_log.new_run_id()
        trial.set_user_attr("wandb_run_id", run_id)
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
        run_id=run_id,
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
            resume=found,
            policy=policy,
            lease=lease,
        )
    except TakenOver as err:
        return _taken_over(trial, status, logger, err)
    except Exception as err:
        fault = machine_fault(err)
        if fault is not None:
            raise fault from err
        record = TrialRecord(
            Outcome.FAILED, settings=flat, error_message=f"{type(err).__name__}: {err}"
        )
        traceback.print_exc()
    with Stops.held_until_recorded():
        if not lease.held() or not _running(study, trial):
            return _taken_over(trial, status, logger, TakenOver(f"{run_dir} was taken over"))
        return _record(study, trial, sweep, record, logger, status)


def _running(study: optuna.Study, trial: optuna.Trial) -> bool:
    return storage_of(study).get_trial(trial_id(trial)).state == TrialState.RUNNING


def _taken_over(trial: optuna.Trial, status: StatusFile, logger: Any, err: TakenOver) -> Outcome:
    """Another worker presumed this one dead and continues its trial: record nothing."""
    print(
        f"worker {status.worker}: trial {trial.number} was taken over by another worker "
        f"(its lease was presumed dead: {err}); not recording it, going on",
        file=sys.stderr,
    )
    with contextlib.suppress(Exception):
        if logger is not None:
            logger.experiment.finish()
    status.write(state="taken over")
    return Outcome.INTERRUPTED


def _record(
    study: optuna.Study,
    trial: optuna.Trial,
    sweep: Sweep,
    record: TrialRecord,
    logger: Any,
    status: StatusFile,
) -> Outcome:
    """The record into the trial, its W&B run finished, and the trial told to the study (one
    value per objective)."""
    values = [record.get(name) for name, _ in sweep.objectives]
    for (name, _), value in zip(sweep.objectives, values):
        if record.outcome == Outcome.COMPLETE and (value is None or not math.isfinite(value)):
            record = record.failed(f"{name} is not finite: {value}")
            break
    run_id = wandb_log.finish(logger, record.fields())
    record = record.with_wandb_run(run_id)
    store(trial, record)
    if not sweep.multi:  # Optuna's intermediate values are for one objective
        report_curve(trial, sweep, record.history)
    if record.outcome == Outcome.COMPLETE:
        study.tell(trial, values if sweep.multi else values[0])
    elif record.outcome == Outcome.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
    else:  # diverged is a result, kept as FAIL with state=diverged and not retried
        study.tell(trial, state=TrialState.FAIL)
    status.write(state=record.outcome)
    return record.outcome


def report_curve(
    trial: optuna.Trial, sweep: Sweep, history: list[dict[str, Any]], *, force: bool = False
) -> None:
    """Each epoch's validation metric as Optuna intermediate values, for every method: the
    dashboard's learning curves. Under hyperband the pruner has reported them already,
    except those of the segments before a resume (`force`)."""
    if sweep.hyperband is not None and not force:
        return
    key = sweep.metric if sweep.metric in ("val/error", "val/loss", "train/loss") else "val/error"
    for row in history:
        value = row.get(key)
        if value is not None and math.isfinite(value):
            trial.report(float(value), int(row["epoch"]))


def _cell_suffix(params: dict[str, Any]) -> str:
    shown = [f"{k.split('.')[-1]}={v}" for k, v in params.items() if k not in ("model.variant",)]
    return (" " + " ".join(shown)) if shown else ""
