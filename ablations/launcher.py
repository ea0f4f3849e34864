"""`ablate sweep`: check the file, open the study, start the workers, show them, close up.

The launcher owns its workers (one process each, `python -m ablations.worker`), pins their
CPU threads or GPUs, draws the live table from their status files, and when trials finished
writes the study's exports and its closing `ablation-table` W&B run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from ablations import settings as S
from ablations import storage as ST
from ablations import study as SD
from ablations import sweep_file as SF
from ablations import wandb_log


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (taskset, Slurm, cgroups), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def _gpus(devices: str) -> list[str]:
    """GPU indices to pin workers to, listed without initialising CUDA in this process."""
    visible = _visible_gpus()
    if devices == "auto":
        return visible
    wanted = [d.strip() for d in devices.split(",") if d.strip()]
    unknown = [d for d in wanted if d not in visible]
    if unknown:
        raise SF.SweepError(
            f"--devices {devices}: no GPU {', '.join(unknown)}; visible GPUs: "
            f"{', '.join(visible) or 'none'}"
        )
    return wanted


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def preflight(
    sweep: SF.Sweep, runs_root: Path, *, storage_given: bool, samples: int = 20
) -> list[tuple[dict[str, Any], str]]:
    """What would fail in every trial, found before any worker starts (and in --dry-run):
    the runs folder must be writable, each data set readable with every cell's split, and
    (random, bayes) `samples` draws of the swept settings valid. Raises SweepError; returns
    the grid cells whose data split cannot work, to skip with their reason. Writes nothing
    (a data set a source downloads is kept, as a trial would keep it)."""
    import optuna

    from datamodules import DATASETS, DataError, split_sizes

    if not storage_given:
        existing = next(p for p in (runs_root, *runs_root.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise SF.SweepError(
                f"runs folder {runs_root} cannot be written ({existing} is not a writable "
                "folder); run from a folder you can write to"
            )
    if sweep.method == "grid":
        cells, _ = sweep.cells()
    else:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        cells = []
        for _ in range(samples):
            trial = study.ask()
            cell = SD.suggest(trial, sweep)
            try:
                S.resolve({**sweep.base, **cell})
            except (S.SettingsError, SF.SpecError) as err:
                raise SF.SweepError(
                    f"parameters: a sampled setting is invalid, so trials would fail: {err} "
                    f"(drawn: {cell})"
                ) from None
            cells.append(cell)
            study.tell(trial, 0.0)
    sizes: dict[tuple[str, str], int] = {}
    skipped = []
    for cell in cells or [{}]:
        settings = S.resolve({**sweep.base, **cell})
        dataset, folder = settings["data.dataset"], settings["data.dir"]
        if (dataset, folder) not in sizes:
            try:
                raw = DATASETS[dataset](Path(folder).expanduser(), True)
            except DataError as err:
                raise SF.SweepError(f"data: {err}") from None
            sizes[(dataset, folder)] = len(raw.train_y)
        try:
            split_sizes(
                sizes[(dataset, folder)], settings["data.val_size"], settings["data.subset"]
            )
        except DataError as err:
            if sweep.method != "grid":
                raise SF.SweepError(f"data: {err}") from None
            skipped.append((cell, str(err)))
    if sweep.method == "grid" and cells and len(skipped) == len(cells):
        raise SF.SweepError(f"every grid cell fails its data split: {skipped[0][1]}")
    return skipped


def dry_run(sweep: SF.Sweep, study_name: str, url: str, skipped: list | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    if sweep.method != "grid":
        console.print(
            f"{study_name}: {sweep.method} search, run_cap {sweep.run_cap} trials, "
            f"up to {sweep.epochs({})} epochs each, storage {url}"
        )
        return
    valid, invalid = sweep.cells()
    bad = {SF.cell_id(c) for c, _ in skipped or []}
    valid = [c for c in valid if SF.cell_id(c) not in bad]
    invalid = [*invalid, *(skipped or [])]
    table = Table(title=f"{study_name}: {len(valid)} cells ({url})")
    table.add_column("#", justify="right")
    for key in sweep.swept:
        table.add_column(key)
    table.add_column("model.name")
    table.add_column("epochs", justify="right")
    epochs = 0
    for i, cell in enumerate(valid):
        flat = S.resolve({**sweep.base, **cell})
        name = S.model_spec(flat).name
        e = sweep.epochs(cell)
        epochs += e
        table.add_row(str(i), *(str(cell[k]) for k in sweep.swept), name, str(e))
    console.print(table)
    for cell, why in invalid:
        print(f"skipped invalid cell {SF.cell_id(cell)}: {why}")
    print(f"{len(valid)} cells to run, {len(invalid)} invalid skipped, {epochs} epochs in all")


def worker_plan(
    gpu_groups: list[str], workers: int, per_device: int, per_trial: int, cpus: int
) -> list[tuple[str | None, int]]:
    """(CUDA_VISIBLE_DEVICES or None, CPU threads) for each worker process.

    With GPUs: `per_device` workers share each group of `per_trial` GPUs (All-CNN-C at batch
    128 fills a fraction of an H100 or H200), workers of one group spread over the groups in
    turn; without: `workers` CPU workers. The CPU threads are split evenly between every
    process that trains (a DDP trial on the CPU runs `per_trial` of them), at least one each.
    """
    if gpu_groups:
        slots = [g for _ in range(per_device) for g in gpu_groups]
        return [(g, max(1, cpus // len(slots))) for g in slots]
    return [(None, max(1, cpus // (workers * per_trial)))] * workers


def launch(args: argparse.Namespace) -> int:
    sweep = SF.load(args.file)
    for note in sweep.notes:
        print(f"{args.file}: {note}", file=sys.stderr)
    study_name = SF.check_study_name(args.study, "--study") if args.study else sweep.name
    runs_dir = Path(args.runs_dir) / study_name
    url = args.storage or ST.default_url(study_name, Path(args.runs_dir))
    gpus = _gpus(args.devices) if args.devices not in (None, "cpu") else []
    k = args.devices_per_trial
    if k < 1:
        raise SF.SweepError(f"--devices-per-trial {k}: give at least 1")
    if k > 1 and sweep.hyperband is not None:
        raise SF.SweepError(
            "early_terminate (hyperband) with --devices-per-trial > 1 is not "
            "supported: pruning decisions would have to cross processes"
        )
    if gpus and len(gpus) % k:
        raise SF.SweepError(
            f"--devices-per-trial {k} does not divide the {len(gpus)} GPUs ({','.join(gpus)})"
        )
    groups = [",".join(gpus[i : i + k]) for i in range(0, len(gpus), k)]
    skipped = preflight(sweep, Path(args.runs_dir), storage_given=args.storage is not None)
    if args.workers < 1:
        raise SF.SweepError(f"--workers {args.workers}: give at least 1")
    if args.trials_per_device < 1:
        raise SF.SweepError(f"--trials-per-device {args.trials_per_device}: give at least 1")
    if args.trials_per_device > 1 and not gpus:
        raise SF.SweepError(
            f"--trials-per-device {args.trials_per_device} shares GPUs between workers; "
            "this run has none (--devices auto or a GPU list); on CPUs use --workers N"
        )
    if args.dry_run:
        dry_run(sweep, study_name, ST.describe_url(url), skipped)
        return 0
    _, invalid = sweep.cells() if sweep.method == "grid" else ([], [])
    invalid = [*invalid, *skipped]
    study = SD.open_study(sweep, url, study_name, create=True)
    study.set_user_attr("sweep.run_cap", sweep.run_cap)
    study.set_user_attr(SD.SKIPPED_ATTR, sorted(SF.cell_id(c) for c, _ in skipped))
    for cell, why in invalid:
        print(f"skipping invalid cell {SF.cell_id(cell)}: {why}", file=sys.stderr)
    wandb_mode = args.wandb or wandb_log.default_mode()
    if args.retry_failed:
        study.set_user_attr(SD.RETRY_ATTR, len(study.get_trials(deepcopy=False)))
    before = SD.totals(study, sweep)
    if before["left"] + before["running"] == 0 and not SD.stale_pending(study):
        print(
            f"{study_name}: nothing left to run ({before['done']}/{before['cells']} done, "
            f"{before['failed']} failed trials, {before['given_up']} given up); storage "
            f"{ST.describe_url(url)}"
        )
        if before["given_up"]:
            _print_errors(study, sweep)
            return 1
        return 0
    plan = worker_plan(groups, args.workers, args.trials_per_device, k, usable_cpus())
    limit = None
    if args.max_trials is not None:
        limit = len(study.get_trials(deepcopy=False)) + args.max_trials
    status_dir = runs_dir / "workers"
    status_dir.mkdir(parents=True, exist_ok=True)
    snapshot = SF.write_snapshot(sweep, runs_dir / "sweep.yaml", args.file)
    procs: list[subprocess.Popen] = []
    t0 = time.time()
    previous = {n: signal.signal(n, _terminated) for n in ST.stop_signals()}
    try:
        with stops_wait():
            for i, (devices, threads) in enumerate(plan):
                argv = [str(snapshot), "--study", study_name, "--runs-dir", str(runs_dir)]
                argv += ["--worker", str(i), "--threads", str(threads), "--wandb", wandb_mode]
                argv += ["--status", str(status_dir / f"worker-{i}.json")]
                argv += ["--devices-per-trial", str(k)]
                argv += ["--limit", str(limit)] if limit is not None else []
                procs.append(_start_worker(argv, url, threads, devices, runs_dir / "logs", i))
        _watch(study, sweep, procs, status_dir, t0)
    except KeyboardInterrupt:
        stop_workers(procs)
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    finally:
        stop_workers(procs, quiet=True)  # whatever happened above, no worker outlives us
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return _close(study, sweep, procs, before, t0, url, wandb_mode, runs_dir)


def _start_worker(
    argv: list[str], url: str, threads: int, devices: str | None, logs: Path, i: int
) -> subprocess.Popen:
    """`python -m ablations.worker ARGV`, its output in logs/worker-<i>.log."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env[ST.STORAGE_ENV] = url  # not in argv, where `ps` shows a database password to all
    # worker.LAUNCHER_ENV (the worker reads it before its imports): it stops when we are gone
    env["ALLCONV_LAUNCHER_PID"] = str(os.getpid())
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"worker-{i}.log", "a") as log:
        cmd = [sys.executable, "-m", "ablations.worker", *argv]
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def stops_wait() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread while workers are started. A thread's signal
    mask passes through fork and exec, so in a new worker a stop that comes while its
    interpreter starts stays pending until it can take it quietly (worker._follow_the_launcher
    unblocks them), instead of a KeyboardInterrupt traceback from the middle of an import;
    here a stop waits until every started worker is in `procs`, which stop_workers reaches."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
    sweep: SF.Sweep,
    procs: list[subprocess.Popen],
    before: dict[str, int],
    t0: float,
    url: str,
    wandb_mode: str,
    runs_dir: Path,
) -> int:
    """The closing lines, exports and exit code: 0 only when every cell (or trial) ran."""
    codes = [p.returncode for p in procs]
    name = study.study_name
    for i, code in enumerate(codes):
        if code:  # the worker's last line is its reason (storage lost, disk full, ...)
            print(
                f"worker {i} exited {code}: {_last_line(runs_dir / 'logs' / f'worker-{i}.log')}",
                file=sys.stderr,
            )
    try:
        final = SD.totals(study, sweep)
    except Exception as err:  # the storage is gone: the workers said so in their logs
        print(f"{name}: storage {ST.describe_url(url)} failed: {err}", file=sys.stderr)
        return 1
    print(
        f"{name}: {final['done']}/{final['cells']} done, {final['failed']} failed "
        f"trials, {final['left']} left, {final['given_up']} given up, "
        f"{time.time() - t0:.0f} s; storage {ST.describe_url(url)}"
    )
    problems = final["given_up"] > 0 or (final["done"] == 0 and final["failed"] > 0)
    if problems:
        _print_errors(study, sweep)
    if any(codes):
        print(f"worker exit codes {codes}; logs in {runs_dir / 'logs'}", file=sys.stderr)
    if final["done"] > before["done"]:
        _closing_table(study, sweep, wandb_mode, runs_dir)
    return 1 if any(codes) or problems else 0


def _last_line(log: Path) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError as err:
        return f"(its log {log} cannot be read: {err.strerror})"
    if not lines:
        return f"(nothing in {log})"
    return ST.describe_url(re.sub(r"^worker \d+: ", "", lines[-1].strip()))


def _print_errors(study: optuna.Study, sweep: SF.Sweep) -> None:
    errors = sorted(SD.errors(study).items(), key=lambda kv: -kv[1])
    if sweep.method == "grid":
        why = f"a cell is given up after {SD.MAX_ATTEMPTS} failed trials"
    else:
        why = f"the sweep stops after {SD.MAX_CONSECUTIVE_FAILURES} failed trials in a row"
    print(f"failed trials ({why}):", file=sys.stderr)
    for message, n in errors[:5]:
        print(f"  {n} x {message}", file=sys.stderr)
    if len(errors) > 5:
        print(f"  ... and {len(errors) - 5} other errors (ablate status)", file=sys.stderr)
    print("fix the cause, then run the same command with --retry-failed", file=sys.stderr)


def _closing_table(study: optuna.Study, sweep: SF.Sweep, mode: str, runs_dir: Path) -> None:
    """The exports under runs/<study>/export, and one `ablation-table` W&B run."""
    from ablations import export

    try:
        export.log_to_wandb(study, sweep, mode, runs_dir)
    except Exception as err:  # the sweep's results are in the study whatever happens here
        print(f"closing export/W&B table failed: {err}", file=sys.stderr)


# --- the live display ------------------------------------------------------------------------


def _worker_lines(status_dir: Path, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        try:
            out.append(json.loads((status_dir / f"worker-{i}.json").read_text()))
        except (OSError, ValueError):
            out.append({"worker": i, "state": "starting"})
    return out


def _render(study_name: str, tot: dict[str, int], lines: list[dict], eta: str):
    from rich.table import Table

    table = Table(
        title=f"{study_name}: {tot['done']} done / {tot['running']} running / "
        f"{tot['failed']} failed / {tot['left']} left   ETA {eta}",
        title_justify="left",
    )
    for col in ("worker", "state", "trial", "cell", "epoch", "val/error"):
        table.add_column(col)
    for w in lines:
        epoch = f"{w.get('epoch', '')}/{w.get('epochs', '')}" if w.get("epochs") else ""
        table.add_row(
            str(w.get("worker")),
            str(w.get("state", "")),
            str(w.get("trial", "")),
            str(w.get("cell") or ""),
            epoch,
            str(w.get("val_error") or ""),
        )
    return table


def live(procs: list[subprocess.Popen]) -> bool:
    """Whether any worker still runs; polls (and so reaps) every one of them. A zombie left
    unreaped keeps its /proc entry, and the stale-trial check then took its dead worker for
    a live one: the survivors waited for its trial forever."""
    return [p.poll() for p in procs].count(None) > 0


def _watch(study: optuna.Study, sweep: SF.Sweep, procs: list, status_dir: Path, t0: float) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    start_done: int | None = None

    def snapshot() -> tuple[dict[str, int] | None, str]:
        nonlocal start_done
        try:
            tot = SD.totals(study, sweep)
        except Exception:  # storage blip or loss: the workers report it; keep reaping them
            return None, "?"
        if start_done is None:
            start_done = tot["done"]
        finished = tot["done"] - start_done
        elapsed = time.time() - t0
        eta = "?"
        if finished > 0 and tot["left"] + tot["running"] > 0:
            # trials finish at `finished / elapsed` a second; running ones are half done
            secs = (tot["left"] + tot["running"] / 2) * elapsed / finished
            eta = time.strftime("%H:%M:%S", time.gmtime(secs))
        elif tot["left"] + tot["running"] == 0:
            eta = "0"
        return tot, eta

    if console.is_terminal:
        with Live(console=console, refresh_per_second=2) as screen:
            while True:
                running = live(procs)
                tot, eta = snapshot()
                if tot is not None:
                    lines = _worker_lines(status_dir, len(procs))
                    screen.update(_render(study.study_name, tot, lines, eta))
                if not running:
                    return
                time.sleep(1)
    # not a terminal (CI, a log file): one line whenever the totals change
    last = None
    while live(procs):
        tot, eta = snapshot()
        if tot != last:  # the totals, not the ETA, which moves every poll
            if tot is None:
                print(f"{study.study_name}: storage unreachable; waiting for the workers")
            else:
                print(
                    f"{study.study_name}: done {tot['done']} running {tot['running']} "
                    f"failed {tot['failed']} left {tot['left']} ETA {eta}",
                    flush=True,
                )
            last = tot
        time.sleep(2)


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
    ST.add_storage_flag(p)
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
        help=f"run again the cells given up after {SD.MAX_ATTEMPTS} failed trials (and a "
        "random/bayes sweep stopped by failures), once their cause is fixed",
    )
    p.add_argument("--dry-run", action="store_true", help="list the cells and their cost")
    p.add_argument(
        "--wandb",
        choices=wandb_log.MODES,
        default=None,
        help="W&B mode (default: WANDB_MODE, else online with W&B credentials, else offline)",
    )
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=launch)
