"""`ablate sweep`: check the file, open the study, start the workers, watch them, close up.

The launcher owns its workers (one process each, `python -m ablations.worker`; the contract
is `ablations/process.py`), pins their CPU threads or GPUs (`preflight.worker_plan`), draws
the live table (`display`), and when trials finished writes the study's exports and its
closing `ablation-table` W&B run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from ablations import process, provenance, wandb_log
from ablations.display import watch
from ablations.preflight import dry_run, gpus_to_use, preflight, usable_cpus, worker_plan
from ablations.process import (
    Exit,
    WorkerStatus,
    free_ports,
    stop_signals,
    stops_wait,
    worker_env,
)
from ablations.resume import CheckpointPolicy, predecessor
from ablations.settings import SettingsError
from ablations.storage import default_url, describe_url
from ablations.study import (
    MAX_ATTEMPTS,
    MAX_CONSECUTIVE_FAILURES,
    RETRY_ATTR,
    SKIPPED_ATTR,
    Totals,
    errors,
    open_study,
    stale_pending,
    totals,
)
from ablations.sweep_file import Sweep, SweepError, cell_id, check_study_name, load, write_snapshot


def launch(args: argparse.Namespace) -> int:
    sweep = load(args.file)
    for note in sweep.notes:
        print(f"{args.file}: {note}", file=sys.stderr)
    study_name = check_study_name(args.study, "--study") if args.study else sweep.name
    runs_dir = Path(args.runs_dir) / study_name
    url = args.storage or default_url(study_name, Path(args.runs_dir))
    gpus = gpus_to_use(args.devices) if args.devices not in (None, "cpu") else []
    k = args.devices_per_trial
    if k < 1:
        raise SweepError(f"--devices-per-trial {k}: give at least 1")
    if k > 1 and sweep.hyperband is not None:
        raise SweepError(
            "early_terminate (hyperband) with --devices-per-trial > 1 is not "
            "supported: pruning decisions would have to cross processes"
        )
    if gpus and len(gpus) % k:
        raise SweepError(
            f"--devices-per-trial {k} does not divide the {len(gpus)} GPUs ({','.join(gpus)})"
        )
    groups = [",".join(gpus[i : i + k]) for i in range(0, len(gpus), k)]
    skipped = preflight(
        sweep, Path(args.runs_dir), storage_given=args.storage is not None, devices_per_trial=k
    )
    if args.workers < 1:
        raise SweepError(f"--workers {args.workers}: give at least 1")
    if args.trials_per_device < 1:
        raise SweepError(f"--trials-per-device {args.trials_per_device}: give at least 1")
    if args.trials_per_device > 1 and not gpus:
        raise SweepError(
            f"--trials-per-device {args.trials_per_device} shares GPUs between workers; "
            "this run has none (--devices auto or a GPU list); on CPUs use --workers N"
        )
    policy = _policy(args)
    if args.dry_run:
        plan = worker_plan(groups, args.workers, args.trials_per_device, k, usable_cpus())
        dry_run(
            sweep, study_name, describe_url(url), skipped, workers=len(plan),
            threads=plan[0][1], use_cuda=bool(groups), study=_existing(sweep, url, study_name),
        )  # fmt: skip
        return Exit.OK
    _, invalid = sweep.cells() if sweep.method == "grid" else ([], [])
    invalid = [*invalid, *skipped]
    study = open_study(sweep, url, study_name, create=True)  # an existing one: nothing written
    check_resumable(study)  # before this run writes anything
    study.set_user_attr("sweep.run_cap", sweep.run_cap)
    if policy is not None:  # recorded with the study: every worker, and later runs, keep it
        policy.record(study)
    study.set_user_attr(SKIPPED_ATTR, sorted(cell_id(c) for c, _ in skipped))
    for cell, why in invalid:
        print(f"skipping invalid cell {cell_id(cell)}: {why}", file=sys.stderr)
    wandb_mode = args.wandb or wandb_log.default_mode()
    if args.retry_failed:
        study.set_user_attr(RETRY_ATTR, len(study.get_trials(deepcopy=False)))
    before = totals(study, sweep)
    if before.unfinished == 0 and not stale_pending(study):
        print(
            f"{study_name}: nothing left to run ({before.done}/{before.cells} done, "
            f"{before.failed} failed trials, {before.given_up} given up); storage "
            f"{describe_url(url)}"
        )
        if before.given_up:
            _print_errors(study, sweep)
            return Exit.PROBLEMS
        return Exit.OK
    plan = worker_plan(groups, args.workers, args.trials_per_device, k, usable_cpus())
    limit = None
    if args.max_trials is not None:
        limit = len(study.get_trials(deepcopy=False)) + args.max_trials
    status_dir = runs_dir / "workers"
    status_dir.mkdir(parents=True, exist_ok=True)
    snapshot = write_snapshot(sweep, runs_dir / "sweep.yaml", args.file)
    # a DDP trial's ranks meet on 127.0.0.1 at their worker's own port, distinct per worker
    ports = free_ports(len(plan)) if k > 1 else [None] * len(plan)
    procs: list[subprocess.Popen] = []
    t0 = time.time()
    launch_key = provenance.record_launch(study, snapshot.read_text(), t0)
    previous = {n: signal.signal(n, _terminated) for n in stop_signals()}
    try:
        with stops_wait():
            for i, (devices, threads) in enumerate(plan):
                argv = [str(snapshot), "--study", study_name, "--runs-dir", str(runs_dir)]
                argv += ["--worker", str(i), "--threads", str(threads), "--wandb", wandb_mode]
                argv += ["--status", str(status_dir / f"worker-{i}.json")]
                argv += ["--devices-per-trial", str(k)]
                argv += ["--gpus"] if devices is not None else []
                argv += ["--ddp-port", str(ports[i])] if ports[i] else []
                argv += ["--limit", str(limit)] if limit is not None else []
                procs.append(_start_worker(argv, url, threads, devices, runs_dir / "logs", i))
        watch(study, sweep, procs, status_dir, t0)
    except KeyboardInterrupt:
        stop_workers(procs)
        print("interrupted: run the same command again to continue", file=sys.stderr)
        provenance.end_launch(study, launch_key, Exit.INTERRUPTED)
        return Exit.INTERRUPTED
    finally:
        stop_workers(procs, quiet=True)  # whatever happened above, no worker outlives us
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code = _close(study, sweep, procs, before, t0, url, wandb_mode, runs_dir)
    provenance.end_launch(study, launch_key, code)
    return code


def _start_worker(
    argv: list[str], url: str, threads: int, devices: str | None, logs: Path, i: int
) -> subprocess.Popen:
    """`python -m ablations.worker ARGV`, its output in logs/worker-<i>.log."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"worker-{i}.log", "a") as log:
        cmd = [sys.executable, "-m", "ablations.worker", *argv]
        env = worker_env(url, threads, devices)
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler's, `kill`) stops the sweep as Ctrl-C does


def stop_workers(procs: list[subprocess.Popen], *, quiet: bool = False, grace: float = 60) -> None:
    """Forward SIGINT to live workers (their trials are marked interrupted, not failed) and
    reap every one; a second Ctrl-C, or `grace` seconds, escalate to SIGTERM, then SIGKILL."""
    alive = [p for p in procs if p.poll() is None]
    if not alive:
        return
    for p in alive:
        with contextlib.suppress(OSError):
            p.send_signal(signal.SIGINT)
    steps = [(signal.SIGTERM, grace), (signal.SIGKILL, 10)]
    deadline = time.time() + grace
    while True:
        try:
            while [p.poll() for p in alive].count(None) and time.time() < deadline:
                time.sleep(0.2)
        except KeyboardInterrupt:
            if not quiet:
                print("stopping the workers now", file=sys.stderr)
        alive = [p for p in alive if p.poll() is None]
        if not alive or not steps:
            break
        sig, wait = steps.pop(0)
        for p in alive:
            with contextlib.suppress(OSError):
                p.send_signal(sig)
        deadline = time.time() + wait
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=1)


def _close(
    study: optuna.Study,
    sweep: Sweep,
    procs: list[subprocess.Popen],
    before: Totals,
    t0: float,
    url: str,
    wandb_mode: str,
    runs_dir: Path,
) -> int:
    """The closing lines, exports and exit code: 0 only when every cell (or trial) ran."""
    codes = [p.returncode for p in procs]
    name = study.study_name
    for i, code in enumerate(codes):
        if code:  # the reason the worker wrote in its status (storage lost, disk full, ...)
            print(f"worker {i} exited {code}: {_reason(runs_dir, i)}", file=sys.stderr)
    try:
        final = totals(study, sweep)
    except Exception as err:  # the storage is gone: the workers said so in their logs
        print(f"{name}: storage {describe_url(url)} failed: {err}", file=sys.stderr)
        return Exit.PROBLEMS
    print(
        f"{name}: {final.done}/{final.cells} done, {final.failed} failed "
        f"trials, {final.left} left, {final.given_up} given up, "
        f"{time.time() - t0:.0f} s; storage {describe_url(url)}"
    )
    problems = final.given_up > 0 or (final.done == 0 and final.failed > 0)
    if problems:
        _print_errors(study, sweep)
    if any(codes):
        print(f"worker exit codes {codes}; logs in {runs_dir / 'logs'}", file=sys.stderr)
    if final.done > before.done:
        _closing_table(study, sweep, wandb_mode, runs_dir)
    if any(codes) and all(c in (0, Exit.BAD_INPUT) for c in codes) and not problems:
        return Exit.BAD_INPUT  # a worker refused its input (e.g. a checkpoint): say it as such
    return Exit.PROBLEMS if any(codes) or problems else Exit.OK


def _reason(runs_dir: Path, i: int) -> str:
    """Why worker i stopped: the reason it wrote in its status file. On a full disk it may
    not have been able to write one; it printed the same line last to its log (opened by
    the launcher, so it exists), which is read then. Killed by a signal, it has neither."""
    status = WorkerStatus.read(runs_dir / "workers" / f"worker-{i}.json", i)
    reason = status.get("reason") or _last_log_line(runs_dir / "logs" / f"worker-{i}.log", i)
    if not reason:
        return f"(no reason in its status; its log is {runs_dir / 'logs' / f'worker-{i}.log'})"
    return describe_url(str(reason))


def _last_log_line(log: Path, i: int) -> str | None:
    """The worker's own last line (`worker <i>: ...`), if that is how its log ends."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [x.strip() for x in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return None
    last = next((x for x in reversed(lines) if x), "")
    prefix = f"worker {i}: "
    return last.removeprefix(prefix) if last.startswith(prefix) else None


def _print_errors(study: optuna.Study, sweep: Sweep) -> None:
    messages = sorted(errors(study).items(), key=lambda kv: -kv[1])
    if sweep.method == "grid":
        why = f"a cell is given up after {MAX_ATTEMPTS} failed trials"
    else:
        why = f"the sweep stops after {MAX_CONSECUTIVE_FAILURES} failed trials in a row"
    print(f"failed trials ({why}):", file=sys.stderr)
    for message, n in messages[:5]:
        print(f"  {n} x {message}", file=sys.stderr)
    if len(messages) > 5:
        print(f"  ... and {len(messages) - 5} other errors (ablate status)", file=sys.stderr)
    print("fix the cause, then run the same command with --retry-failed", file=sys.stderr)


def _closing_table(study: optuna.Study, sweep: Sweep, mode: str, runs_dir: Path) -> None:
    try:
        closing_outputs(study, sweep, mode, runs_dir)
    except Exception as err:  # the sweep's results are in the study whatever happens here
        print(f"closing export/report/W&B table failed: {err}", file=sys.stderr)


def closing_outputs(study: optuna.Study, sweep: Sweep, mode: str, runs_dir: Path) -> None:
    """The end of a sweep: the exports under runs/<study>/export, the report at
    runs/<study>/report.html, and one `ablation-table` W&B run holding both."""
    from ablations import export, report

    tables = export.build(study)
    files = export.write(study, runs_dir / "export", formats=list(export.FORMATS), tables=tables)
    page = None
    try:
        page = report.write(
            runs_dir / "report.html", report.build(study, runs_dir=runs_dir, tables=tables)
        )
    except export.ExportError:  # no finished trial yet: nothing to report
        pass
    html = {"report": page} if page is not None else None
    export.log_to_wandb(study, sweep, mode, runs_dir, tables=tables, files=files, html=html)


def check_resumable(study: optuna.Study) -> None:
    """The checkpoints the workers will continue: one of another cell, or of a network this
    code does not load, stops the sweep here (exit 2) before any worker starts."""
    trials = study.get_trials(deepcopy=False)
    waiting = [t for t in trials if predecessor([t], trials) is not None]
    if not waiting:
        return
    from ablations.checkpoints import check_folder  # torch: only for a study with some

    for t in waiting:
        if t.user_attrs.get("settings"):
            check_folder(Path(t.user_attrs["run_dir"]), t.user_attrs["settings"])


def _existing(sweep: Sweep, url: str, name: str) -> optuna.Study | None:
    """The study a dry run estimates what is left of, if it has run; never created."""
    try:
        return open_study(sweep, url, name, create=False)
    except (SweepError, OSError, KeyError):
        return None


def _policy(args: argparse.Namespace) -> CheckpointPolicy | None:
    """The checkpoint options given, or None: the study keeps the policy it has."""
    given = (args.checkpoint_every, args.checkpoint_minutes, args.keep_checkpoints)
    if given == (None, None, False):
        return None
    try:
        return CheckpointPolicy(
            every_epochs=1 if args.checkpoint_every is None else args.checkpoint_every,
            every_minutes=args.checkpoint_minutes,
            keep_all=args.keep_checkpoints,
        )
    except SettingsError as err:
        raise SweepError(str(err)) from None


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a sweep file with Optuna (resumable)",
        description="Create or join the study named by the sweep file and run "
        "its trials in worker processes. Run the same command again to resume.",
        epilog=wandb_log.PRECEDENCE + ". Offline runs upload later with one command: wandb sync "
        "runs/<study>/trials/*/wandb/offline-run-* runs/<study>/wandb/offline-run-*",
    )
    p.add_argument("file", help="sweep file (W&B sweep schema), e.g. sweeps/quickstart.yaml")
    p.add_argument("--study", help="study name (default: the file's name)")
    process.storage_flag(p)
    p.add_argument("--workers", type=int, default=1, help="CPU worker processes")
    p.add_argument(
        "--devices", default=None, help="auto or a GPU list (0,1,...): one worker per GPU"
    )
    p.add_argument(
        "--devices-per-trial",
        type=int,
        default=1,
        metavar="K",
        help="GPUs (or CPU processes) per trial, trained with Lightning DDP",
    )
    p.add_argument(
        "--trials-per-device",
        type=int,
        default=1,
        metavar="N",
        help="workers sharing each GPU (or GPU group), each with its share of the CPU threads",
    )
    p.add_argument("--max-trials", type=int, default=None, help="start at most this many")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help=f"run again the cells given up after {MAX_ATTEMPTS} failed trials (and a "
        "random/bayes sweep stopped by failures), once their cause is fixed",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="a trial writes its resumable checkpoint every N epochs (default 1; recorded "
        "with the study)",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=None,
        metavar="M",
        help="and whenever M minutes passed since its last one",
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="a completed trial keeps its last two epoch checkpoints besides last.ckpt",
    )
    p.add_argument("--dry-run", action="store_true", help="list the cells and their estimated cost")
    p.add_argument(
        "--wandb",
        choices=wandb_log.MODES,
        default=None,
        help="W&B mode (default: WANDB_MODE, else online with W&B credentials, else offline)",
    )
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=launch)
