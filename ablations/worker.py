"""A sweep worker process: claim a cell, train it, record the result, until none is left.

Started by the launcher as `python -m ablations.worker FILE --study ... --storage ...`; one per
CPU slot or GPU group. Everything a trial needs comes from the sweep file and the study.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LAUNCHER_ENV = "ALLCONV_LAUNCHER_PID"  # set by the launcher: a worker stops when it is gone


def _follow_the_launcher() -> None:
    """Before the heavy imports below (about 10 s), in a worker the launcher started: a stop
    that came while the interpreter started (the launcher starts workers with stops blocked,
    launcher.stops_wait) or comes while they run ends the worker quietly (no
    trial is claimed yet, nothing to record). On Linux the kernel sends SIGINT when the
    launcher dies, SIGKILL included, so the trial in progress is interrupted and marked so,
    as when the launcher forwards Ctrl-C; elsewhere the loop in _work notices the launcher
    gone between trials. Only in the worker's own process: DDP ranks re-import this module
    as __mp_main__."""
    if os.environ.get(LAUNCHER_ENV) is None:
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    for signum in stops:
        signal.signal(signum, lambda *_: os._exit(130))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # blocked by the launcher until now
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGINT))


if __name__ == "__main__":
    _follow_the_launcher()

import optuna  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna_integration import PyTorchLightningPruningCallback  # noqa: E402

from ablations import run, wandb_log  # noqa: E402
from ablations import settings as S  # noqa: E402
from ablations import storage as ST  # noqa: E402
from ablations import study as SD  # noqa: E402
from ablations import sweep_file as SF  # noqa: E402


class StatusFile(Callback):
    """Writes this worker's live line (cell, epoch, val error) for the launcher to show."""

    def __init__(self, path: Path | None, worker: int) -> None:
        self.path, self.worker = path, worker
        self.info: dict[str, Any] = {}

    def write(self, **info: Any) -> None:
        self.info.update(info, worker=self.worker, updated=time.time())
        if self.path is None:
            return
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # a writer's own, never shared
        try:
            tmp.write_text(json.dumps(self.info, default=str))
            os.replace(tmp, self.path)
        except OSError:  # the display's line only (a full disk, say): never a trial's failure
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

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
            self.stop_state, self.stop_message = "pruned", str(err)
            trainer.should_stop = True


def claim(
    study: optuna.Study, sweep: SF.Sweep, url: str, limit: int | None
) -> optuna.Trial | None | str:
    """Under the lock: recover dead trials, then take the next cell. Returns a trial, None
    (nothing left), or "wait" (nothing open, but trials still running elsewhere)."""
    with ST.claim_lock(url, study.study_name):
        ST.fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state == TrialState.WAITING:
                # enqueued by a worker that died before asking; under the lock no other
                # trial can be waiting, and leaving it would let a later ask run it twice
                ST.fail_trial(
                    study, t, "enqueued by a worker that died before running it", interrupted=True
                )
        trials = study.get_trials(deepcopy=False)
        if limit is not None and len(trials) >= limit:
            return None
        if SD.target_reached(study, sweep):
            return None
        if sweep.method == "grid":
            cells = SD.cell_states(sweep, trials, SD.retry_from(study), SD.skipped(study))
            open_cells = [e for e in cells.values() if e["state"] == "left"]
            if not open_cells:
                running = any(e["state"] == "running" for e in cells.values())
                return "wait" if running else None
            cell = open_cells[0]["cell"]
            study.enqueue_trial(cell, user_attrs={"cell": SF.cell_id(cell)}, skip_if_exists=False)
            trial = study.ask()
        else:
            if SD.failure_streak(trials, SD.retry_from(study)) is not None:
                return None  # the launcher says why
            counted = [t for t in trials if SD.trial_state(t) in (*SD.DONE_STATES, "running")]
            if len(counted) >= sweep.run_cap:
                return "wait" if any(t.state == TrialState.RUNNING for t in trials) else None
            trial = study.ask()
        for key, value in ST.owner_stamp().items():
            trial.set_user_attr(key, value)
        return trial


def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    sweep: SF.Sweep,
    *,
    runs_dir: Path,
    wandb_mode: str,
    status: StatusFile,
    devices: int = 1,
) -> str:
    """Train one trial and record it in the study; returns its state.

    A signal (Ctrl-C, SIGTERM; Lightning turns one during a fit into SystemExit) marks the
    trial interrupted, which is not held against its cell, and stops the worker. Once the
    fit has returned, signals wait until the result is recorded: a finished run is never lost.
    """
    with ST.Heartbeat(ST.storage_of(study), ST.trial_id(trial)):
        try:
            state = _run_trial(
                study,
                trial,
                sweep,
                runs_dir=runs_dir,
                wandb_mode=wandb_mode,
                status=status,
                devices=devices,
            )
        except (KeyboardInterrupt, SystemExit):
            with contextlib.suppress(Exception):
                ST.fail_trial(study, trial, "interrupted by a signal", interrupted=True)
                status.write(state="interrupted")
            raise
        except OSError as err:  # the machine's fault (disk full, folder read-only), not the cell's
            with contextlib.suppress(Exception):
                ST.fail_trial(study, trial, f"{type(err).__name__}: {err}", interrupted=True)
                status.write(state="interrupted")
            raise
        finally:
            _Signals.held = False
    if _Signals.pending is not None:  # it waited for the record; now the worker stops
        _Signals.pending = None
        raise KeyboardInterrupt
    return state


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    sweep: SF.Sweep,
    *,
    runs_dir: Path,
    wandb_mode: str,
    status: StatusFile,
    devices: int,
) -> str:
    try:
        params = SD.suggest(trial, sweep)
        settings = S.resolve({**sweep.base, **params})
        prepared = run.prepare(settings)
        flat = prepared.flat
    except Exception as err:
        trial.set_user_attr("error_message", f"{type(err).__name__}: {err}")
        study.tell(trial, state=TrialState.FAIL)
        return "failed"
    trial.set_user_attr("settings", {k: v for k, v in flat.items()})
    status.write(
        trial=trial.number,
        cell=flat["model.name"] + _cell_suffix(params),
        epoch=0,
        epochs=settings["train.epochs"],
        val_error=None,
        state="running",
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
    callbacks: list = [status, HoldSignalsAfterFit()]
    if sweep.hyperband is not None:
        callbacks.append(Pruning(trial, monitor=sweep.metric))
    state, result = "failed", {}
    try:
        result = run.train(
            settings,
            run_dir,
            loggers=[logger] if logger else [],
            callbacks=callbacks,
            progress=False,
            prepared=prepared,
            devices=devices,
        )
        state = result["state"]
    except Exception as err:
        fault = ST.machine_fault(err)
        if fault is not None:
            raise fault from err
        result = {"error_message": f"{type(err).__name__}: {err}"}
        traceback.print_exc()
    with signals_held():
        return _record(study, trial, sweep, result, state, logger, status)


class _Signals:
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


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Signals that arrive while the block runs wait; run_trial stops the worker after it."""
    _Signals.held = True
    try:
        yield
    finally:
        _Signals.held = False


class HoldSignalsAfterFit(Callback):
    """From the end of the fit, a signal waits until the trial is recorded: a run that
    trained to the end is tested, written and told to the study, then the worker stops."""

    def on_fit_end(self, trainer, pl_module) -> None:
        _Signals.held = True

    def on_test_start(self, trainer, pl_module) -> None:
        # trainer.test installs Lightning's SIGTERM handler again, in front of ours: it sets
        # a flag on which the evaluation loop ends the pass (SIGTERMException), and a trained
        # run was then interrupted. Ours alone handles SIGTERM through the test; Lightning
        # restores it at teardown anyway.
        if _Signals.held and trainer.is_global_zero:
            signal.signal(signal.SIGTERM, _Signals.handler)
            lightning_took_a_sigterm_of_ours(trainer)


def lightning_took_a_sigterm_of_ours(trainer) -> None:
    """A SIGTERM between trainer.test's handler and on_test_start reached Lightning too, and
    set the flag its evaluation loop checks; ours holds it, so Lightning's is cleared. Private
    API (Lightning 2.6's _SignalConnector), the one use in this project."""
    if _Signals.pending is not None:
        trainer._signal_connector.received_sigterm = False


def _record(
    study: optuna.Study,
    trial: optuna.Trial,
    sweep: SF.Sweep,
    result: dict[str, Any],
    state: str,
    logger: Any,
    status: StatusFile,
) -> str:
    """The run's result into the trial, and the trial told to the study."""
    summary = {k: _finite(v) for k, v in result.items() if k != "history"}
    summary["wandb_run_id"] = wandb_log.finish(logger, {**summary, "state": state})
    for key, value in summary.items():
        if value is not None:
            trial.set_user_attr(key, value)
    trial.set_user_attr("state", state)
    report_curve(trial, sweep, result.get("history") or [])
    if state == "complete":
        value = result.get(sweep.metric)
        if value is None or not math.isfinite(value):
            trial.set_user_attr("error_message", f"{sweep.metric} is not finite: {value}")
            study.tell(trial, state=TrialState.FAIL)
            return "failed"
        study.tell(trial, value)
    elif state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:  # diverged is a result, kept as FAIL with state=diverged and not retried
        study.tell(trial, state=TrialState.FAIL)
    status.write(state=state)
    return state


def report_curve(trial: optuna.Trial, sweep: SF.Sweep, history: list[dict[str, Any]]) -> None:
    """Each epoch's validation metric as Optuna intermediate values, for every method: the
    dashboard's learning curves. Under hyperband the pruner has reported them already."""
    if sweep.hyperband is not None:
        return
    key = sweep.metric if sweep.metric in ("val/error", "val/loss", "train/loss") else "val/error"
    for row in history:
        value = row.get(key)
        if value is not None and math.isfinite(value):
            trial.report(float(value), int(row["epoch"]))


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _cell_suffix(params: dict[str, Any]) -> str:
    shown = [f"{k.split('.')[-1]}={v}" for k, v in params.items() if k not in ("model.variant",)]
    return (" " + " ".join(shown)) if shown else ""


def main(argv: list[str] | None = None) -> int:
    """A worker process: claim, train, record, until the study has nothing left."""
    p = argparse.ArgumentParser(prog="python -m ablations.worker")
    p.add_argument("file")
    p.add_argument("--study", required=True)
    # the launcher passes the URL in the environment, not argv, where `ps` would show its
    # password to every user of the machine
    p.add_argument("--storage", default=os.environ.get(ST.STORAGE_ENV))
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--wandb", default="offline", choices=wandb_log.MODES)
    p.add_argument("--limit", type=int, default=None, help="stop once the study has this many")
    p.add_argument("--status", default=None)
    p.add_argument("--devices-per-trial", type=int, default=1)
    args = p.parse_args(argv)
    if not args.storage:
        p.error(f"give --storage or set {ST.STORAGE_ENV}")
    stops = [signal.SIGINT, *ST.stop_signals()]
    previous = {n: signal.signal(n, _Signals.handler) for n in stops}
    try:
        return _work(args)
    finally:  # tests run workers inside the pytest process: leave its handlers as they were
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _work(args: argparse.Namespace) -> int:
    run.set_threads(args.threads)
    status = StatusFile(Path(args.status) if args.status else None, args.worker)
    status.write(
        state="starting", devices=os.environ.get("CUDA_VISIBLE_DEVICES"), threads=args.threads
    )
    runs_dir = Path(args.runs_dir)
    launcher = os.environ.get(LAUNCHER_ENV)
    try:
        sweep = SF.load(args.file)
        study = SD.open_study(sweep, args.storage, args.study, create=False, worker=args.worker)
        while True:
            if launcher is not None and str(os.getppid()) != launcher:
                # the launcher was killed and no parent-death signal came (not Linux, or it
                # died before _follow_the_launcher): start nothing new; the same command resumes
                print(f"worker {args.worker}: the launcher is gone; stopping", file=sys.stderr)
                status.write(state="launcher gone")
                return 0
            trial = claim(study, sweep, args.storage, args.limit)
            if trial is None:
                break
            if trial == "wait":
                status.write(state="waiting")
                time.sleep(2)
                continue
            run_trial(
                study,
                trial,
                sweep,
                runs_dir=runs_dir,
                wandb_mode=args.wandb,
                status=status,
                devices=args.devices_per_trial,
            )
    except (KeyboardInterrupt, SystemExit):
        # another worker of the same sweep may run the cell again before any re-run does
        print(
            f"worker {args.worker}: interrupted; its trial is not a failed attempt and is run "
            "again",
            file=sys.stderr,
        )
        return 130
    except SF.SweepError as err:
        print(f"worker {args.worker}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not is_storage_error(err):
            raise
        # the study is where results live: without it, stop; the same command resumes
        status.write(state="storage lost")
        fault = ST.machine_fault(err)
        what = (
            f"cannot write: {fault}"
            if fault is not None and not isinstance(err, ST.JournalLost)
            else f"storage {ST.describe_url(args.storage)} failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0]}"
        )
        print(
            f"worker {args.worker}: {what}; stopping. Run the same command again once that "
            "is mended: finished trials are kept, this one is re-run.",
            file=sys.stderr,
        )
        return 3
    status.write(state="done", cell=None)
    return 0


def is_storage_error(err: BaseException) -> bool:
    import sqlalchemy.exc

    return isinstance(err, sqlalchemy.exc.SQLAlchemyError | OSError) or (
        err.__cause__ is not None and is_storage_error(err.__cause__)
    )


if __name__ == "__main__":
    sys.exit(main())
