"""A sweep worker process: claim a cell, train it, record it, until none is left.

Started by the launcher (the contract, its environment, signals, status file and exit
codes, is `ablations/process.py`) as `python -m ablations.worker SNAPSHOT --study ...
--runs-dir ...`, one per CPU slot or GPU group; its storage URL comes in the environment.
Everything a trial needs comes from the sweep file and the study.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ablations import process

if __name__ == "__main__":
    process.follow_the_launcher()  # before the heavy imports below

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from ablations import run, wandb_log  # noqa: E402
from ablations.journal import JournalLost  # noqa: E402
from ablations.liveness import fail_stale, owner_stamp  # noqa: E402
from ablations.process import Exit, Stops, machine_fault  # noqa: E402
from ablations.record import Outcome  # noqa: E402
from ablations.resume import CheckpointPolicy, ResumeError, predecessor, successor_attrs  # noqa: E402
from ablations.storage import claim_lock, describe_url, fail_trial  # noqa: E402
from ablations.study import (  # noqa: E402
    failure_streak,
    open_study,
    retry_from,
    study_cells,
    target_reached,
    trial_state,
)
from ablations.sweep_file import Sweep, SweepError, cell_id, load  # noqa: E402
from ablations.trial import StatusFile, run_trial  # noqa: E402


@dataclass(frozen=True)
class Claim:
    """What a worker got from the study: a trial to run, or none; with none, whether trials
    still run elsewhere (wait: one may fail and leave its cell open again) or the study is
    done for this worker."""

    trial: optuna.Trial | None = None
    others_running: bool = False


def claim(study: optuna.Study, sweep: Sweep, url: str, limit: int | None) -> Claim:
    """Under the lock: recover dead trials, then take the next cell, an interrupted trial's
    first: it continues from its checkpoint (ablations/resume.py)."""
    with claim_lock(url, study.study_name):
        fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state == TrialState.WAITING:
                # enqueued by a worker that died before asking; under the lock no other
                # trial can be waiting, and leaving it would let a later ask run it twice
                fail_trial(
                    study, t, "enqueued by a worker that died before running it", interrupted=True
                )
        trials = study.get_trials(deepcopy=False)
        if limit is not None and len(trials) >= limit:
            return Claim()
        if target_reached(study, sweep):
            return Claim()
        if sweep.method == "grid":
            cells = study_cells(study, sweep).values()
            open_cells = [e for e in cells if e.state == "left"]
            if not open_cells:
                return Claim(others_running=any(e.state == Outcome.RUNNING for e in cells))
            # a cell whose newest trial was interrupted with a checkpoint first
            entry, prev = open_cells[0], None
            for e in open_cells:
                newest = max(e.trials, key=lambda t: t.number, default=None)
                if newest is not None and (prev := predecessor([newest], trials)) is not None:
                    entry = e
                    break
            attrs = {"cell": cell_id(entry.cell), **(successor_attrs(prev) if prev else {})}
            study.enqueue_trial(entry.cell, user_attrs=attrs, skip_if_exists=False)
            trial = study.ask()
        else:
            if failure_streak(trials, retry_from(study)) is not None:
                return Claim()  # the launcher says why
            states = [trial_state(t) for t in trials]
            if sum(s.done or s == Outcome.RUNNING for s in states) >= sweep.run_cap:
                return Claim(others_running=Outcome.RUNNING in states)
            prev = predecessor(trials, trials)
            if prev is not None:  # the same parameters, continued
                study.enqueue_trial(prev.params, user_attrs=successor_attrs(prev))
            trial = study.ask()
        for key, value in owner_stamp().items():
            trial.set_user_attr(key, value)
        return Claim(trial)


def main(argv: list[str] | None = None) -> int:
    """A worker process: claim, train, record, until the study has nothing left."""
    p = argparse.ArgumentParser(prog="python -m ablations.worker")
    p.add_argument("file")
    p.add_argument("--study", required=True)
    process.storage_flag(p)
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--wandb", default="offline", choices=wandb_log.MODES)
    p.add_argument("--limit", type=int, default=None, help="stop once the study has this many")
    p.add_argument("--status", default=None)
    p.add_argument("--devices-per-trial", type=int, default=1)
    p.add_argument("--gpus", action="store_true", help="pinned to GPUs: train on them or stop")
    p.add_argument("--ddp-port", type=int, default=None, help="where a DDP trial's ranks meet")
    args = p.parse_args(argv)
    if not args.storage:
        p.error(f"give --storage or set {process.STORAGE_ENV}")
    status = StatusFile(Path(args.status) if args.status else None, args.worker)
    with Stops.installed():
        try:
            code, reason = _work(args, status)
        except Exception as err:  # a bug: its traceback goes to the log, its line to the status
            status.write(state="crashed", reason=f"{type(err).__name__}: {err}")
            raise
    if reason is not None:
        print(f"worker {args.worker}: {reason}", file=sys.stderr)
        status.write(reason=reason)
    return code


def _work(args: argparse.Namespace, status: StatusFile) -> tuple[Exit, str | None]:
    """The claim-train-record loop; returns the exit code and, unless the study simply ran
    out of cells, the one line that says why the worker stopped."""
    run.set_threads(args.threads)
    status.write(
        state="starting", devices=os.environ.get("CUDA_VISIBLE_DEVICES"), threads=args.threads
    )
    if args.gpus and (problem := run.gpu_problem(args.devices_per_trial)) is not None:
        if not os.environ.get(process.CPU_FOR_GPU_ENV):
            status.write(state="no GPU")
            return Exit.NO_GPU, f"{problem}; it does not train on the CPU instead"
        print(f"worker {args.worker}: {problem}; training on the CPU, as "
              f"{process.CPU_FOR_GPU_ENV} asks", file=sys.stderr)  # fmt: skip
    try:
        sweep = load(args.file)
        study = open_study(sweep, args.storage, args.study, create=False, worker=args.worker)
        policy = CheckpointPolicy.of(study)
        while True:
            if process.launcher_gone():
                # no parent-death signal came (not Linux, or the launcher died before
                # follow_the_launcher): start nothing new; the same command resumes
                status.write(state="launcher gone")
                return Exit.OK, "the launcher is gone; stopping"
            got = claim(study, sweep, args.storage, args.limit)
            if got.trial is None and got.others_running:
                status.write(state="waiting")
                time.sleep(2)
                continue
            if got.trial is None:
                break
            run_trial(
                study,
                got.trial,
                sweep,
                runs_dir=Path(args.runs_dir),
                wandb_mode=args.wandb,
                status=status,
                devices=args.devices_per_trial,
                ddp_port=args.ddp_port,
                policy=policy,
            )
    except (KeyboardInterrupt, SystemExit):
        # another worker of the same sweep may run the cell again before any re-run does
        status.write(state=Outcome.INTERRUPTED)
        return (
            Exit.INTERRUPTED,
            "interrupted; its trial is not a failed attempt: the next run continues it from "
            "its last checkpoint",
        )
    except (SweepError, ResumeError) as err:
        status.write(state="bad input")
        return Exit.BAD_INPUT, str(err)
    except Exception as err:
        if not is_storage_error(err):
            raise
        # the study is where results live: without it, stop; the same command resumes
        status.write(state="storage lost")
        fault = machine_fault(err)
        what = (
            f"cannot write: {fault}"
            if fault is not None and not isinstance(err, JournalLost)
            else f"storage {describe_url(args.storage)} failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0]}"
        )
        return Exit.STORAGE_LOST, (
            f"{what}; stopping. Run the same command again once that is mended: finished "
            "trials are kept, this one is re-run."
        )
    status.write(state="done", cell=None)
    return Exit.OK, None


def is_storage_error(err: BaseException) -> bool:
    import sqlalchemy.exc

    return isinstance(err, sqlalchemy.exc.SQLAlchemyError | OSError) or (
        err.__cause__ is not None and is_storage_error(err.__cause__)
    )


if __name__ == "__main__":
    sys.exit(main())
