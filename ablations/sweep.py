"""`ablate sweep` and `ablate status`: Optuna studies run by worker processes.

The study is the single source of truth. Each grid cell is claimed under a lock (see
storage.claim_lock) and enqueued as a trial with its parameters fixed, so racing workers never
run a cell twice; Optuna's GridSampler alone cannot promise that (its docs say so) and it
counts failed trials as visited, which would stop a dead worker's cell from being re-run.
Random and bayes sweeps use Optuna's RandomSampler and TPESampler, which every worker rebuilds
from the file, since Optuna does not store samplers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from ablations import settings as S
from ablations import storage as ST
from ablations import sweep_file as SF
from ablations import wandb_log

MAX_ATTEMPTS = 2  # a cell whose trial raised is tried this many times in all, then left
DEFINITION_ATTR = "sweep.definition"
DONE_STATES = ("complete", "pruned", "diverged")


# --- the study -------------------------------------------------------------------------------


def sampler_for(sweep: SF.Sweep, worker: int = 0) -> optuna.samplers.BaseSampler:
    # every worker rebuilds the sampler from the file; distinct seeds stop two workers of a
    # random sweep from drawing the same sequence
    seed = zlib.crc32(sweep.name.encode()) % 2**31 + worker
    if sweep.method == "bayes":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def pruner_for(sweep: SF.Sweep) -> optuna.pruners.BasePruner:
    if sweep.hyperband is None:
        return optuna.pruners.NopPruner()
    hb = sweep.hyperband
    return optuna.pruners.HyperbandPruner(
        min_resource=hb["min_iter"],
        max_resource=hb["max_iter"] or "auto",
        reduction_factor=hb["eta"],
    )


def open_study(
    sweep: SF.Sweep, url: str, study_name: str, *, create: bool, worker: int = 0
) -> optuna.Study:
    """Create or join; a name reused with a different definition is refused before writing."""
    storage = ST.open_storage(url, create=create)
    direction = "minimize" if sweep.goal == "minimize" else "maximize"
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if study_name in existing:
        old = existing[study_name].user_attrs.get(DEFINITION_ATTR)
        if old is not None and json.loads(json.dumps(sweep.definition(), default=str)) != old:
            changed = sorted(
                k
                for k in SF.DEFINING
                if json.dumps(old.get(k), sort_keys=True, default=str)
                != json.dumps(sweep.definition().get(k), sort_keys=True, default=str)
            )
            raise SF.SweepError(
                f"study {study_name!r} in {ST.describe_url(url)} was made from a different "
                f"sweep definition (differs in: {', '.join(changed)}); use another name "
                "(--study NAME) or the original file"
            )
    elif not create:
        raise SF.SweepError(f"no study {study_name!r} in {ST.describe_url(url)}")
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction=direction,
        sampler=sampler_for(sweep, worker),
        pruner=pruner_for(sweep),
        load_if_exists=True,
    )
    if study_name not in existing:
        study.set_user_attr(
            DEFINITION_ATTR, json.loads(json.dumps(sweep.definition(), default=str))
        )
        study.set_user_attr("sweep.name", sweep.name)
        study.set_user_attr("sweep.description", sweep.description)
        study.set_user_attr("sweep.swept", sweep.swept)
    return study


def trial_state(t: optuna.trial.FrozenTrial) -> str:
    """complete, failed, pruned, diverged or running."""
    if t.user_attrs.get("state") == "diverged":
        return "diverged"
    return {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }[t.state]


def cell_states(sweep: SF.Sweep, trials: list) -> dict[str, dict[str, Any]]:
    """Per grid cell: its state (done / running / failed / left) and its trials."""
    valid, _ = sweep.cells()
    cells = {SF.cell_id(c): {"cell": c, "trials": [], "state": "left"} for c in valid}
    for t in trials:
        cid = t.user_attrs.get("cell")
        if cid in cells:
            cells[cid]["trials"].append(t)
    for entry in cells.values():
        states = [trial_state(t) for t in entry["trials"]]
        if any(s in DONE_STATES for s in states):
            entry["state"] = next(s for s in states if s in DONE_STATES)
        elif "running" in states:
            entry["state"] = "running"
        elif states.count("failed") >= MAX_ATTEMPTS:
            entry["state"] = "failed"
    return cells


# --- one worker ------------------------------------------------------------------------------


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
        tmp.write_text(json.dumps(self.info, default=str))
        os.replace(tmp, self.path)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # under DDP every rank runs this callback; two writers renaming one temporary file
        # failed a trial (FileNotFoundError), and rank 0's line is the trial's line anyway
        if not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val/error")
        self.write(
            epoch=trainer.current_epoch + 1, val_error=None if val is None else round(float(val), 2)
        )


class Pruning(PyTorchLightningPruningCallback):
    """Optuna's Lightning pruning callback, stopping the fit instead of raising, so the
    trial keeps its curves, timings and parameters like any other."""

    stop_state: str | None = None
    stop_message: str | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        try:
            super().on_validation_end(trainer, pl_module)
        except optuna.TrialPruned as err:
            self.stop_state, self.stop_message = "pruned", str(err)
            trainer.should_stop = True


def _claim(
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
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
        if limit is not None and len(trials) >= limit:
            return None
        if sweep.method == "grid":
            cells = cell_states(sweep, trials)
            open_cells = [e for e in cells.values() if e["state"] == "left"]
            if not open_cells:
                running = any(e["state"] == "running" for e in cells.values())
                return "wait" if running else None
            cell = open_cells[0]["cell"]
            study.enqueue_trial(cell, user_attrs={"cell": SF.cell_id(cell)}, skip_if_exists=False)
            trial = study.ask()
        else:
            counted = [t for t in trials if trial_state(t) != "failed"]
            if len(counted) >= sweep.run_cap:
                return "wait" if any(t.state == TrialState.RUNNING for t in trials) else None
            trial = study.ask()
        for key, value in ST.owner_stamp().items():
            trial.set_user_attr(key, value)
        return trial


def _suggest(trial: optuna.Trial, sweep: SF.Sweep) -> dict[str, Any]:
    params = {}
    for key in sweep.swept:
        p = sweep.params[key]
        if p.values is not None:
            params[key] = trial.suggest_categorical(key, list(p.values))
        elif p.distribution == "int_uniform":
            params[key] = trial.suggest_int(key, int(p.low), int(p.high))
        else:
            params[key] = trial.suggest_float(
                key, p.low, p.high, log=p.distribution == "log_uniform_values"
            )
    return params


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
    """Train one trial and record it in the study; returns its state."""
    from ablations import run

    storage = study._storage
    with ST.Heartbeat(storage, trial._trial_id):
        try:
            params = _suggest(trial, sweep)
            settings = S.resolve({**sweep.base, **params})
            dm, module, flat = run.prepare(settings)
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
        run_dir = runs_dir / "trials" / f"{trial.number:04d}-{run.run_name(flat)}"
        logger = wandb_log.trial_logger(
            wandb_mode,
            study=study.study_name,
            trial=trial.number,
            flat=flat,
            swept=sweep.swept,
            save_dir=run_dir,
            project=sweep.project,
            entity=sweep.entity,
        )
        callbacks: list = [status]
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
                prepared=(dm, module, flat),
                devices=devices,
            )
            state = result["state"]
        except Exception as err:
            result = {"error_message": f"{type(err).__name__}: {err}"}
            traceback.print_exc()
        summary = {k: _finite(v) for k, v in result.items() if k != "history"}
        summary["wandb_run_id"] = wandb_log.finish(logger, {**summary, "state": state})
        for key, value in summary.items():
            if value is not None:
                trial.set_user_attr(key, value)
        trial.set_user_attr("state", state)
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


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _cell_suffix(params: dict[str, Any]) -> str:
    shown = [f"{k.split('.')[-1]}={v}" for k, v in params.items() if k not in ("model.variant",)]
    return (" " + " ".join(shown)) if shown else ""


def worker_main(argv: list[str] | None = None) -> int:
    """A worker process: claim, train, record, until the study has nothing left."""
    p = argparse.ArgumentParser(prog="ablations.sweep worker")
    p.add_argument("file")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--wandb", default="offline", choices=wandb_log.MODES)
    p.add_argument("--limit", type=int, default=None, help="stop once the study has this many")
    p.add_argument("--status", default=None)
    p.add_argument("--devices-per-trial", type=int, default=1)
    args = p.parse_args(argv)
    from ablations import run

    run.set_threads(args.threads)
    sweep = SF.load(args.file)
    study = open_study(sweep, args.storage, args.study, create=False, worker=args.worker)
    status = StatusFile(Path(args.status) if args.status else None, args.worker)
    status.write(state="starting")
    runs_dir = Path(args.runs_dir)
    try:
        while True:
            trial = _claim(study, sweep, args.storage, args.limit)
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
    except Exception as err:
        if not _is_storage_error(err):
            raise
        # the study is where results live: without it, stop; the same command resumes
        status.write(state="storage lost")
        print(
            f"worker {args.worker}: storage {ST.describe_url(args.storage)} failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0]}; stopping. Run the same "
            "command again when it is back: finished trials are kept, this one is re-run.",
            file=sys.stderr,
        )
        return 3
    status.write(state="done", cell=None)
    return 0


def _is_storage_error(err: BaseException) -> bool:
    import sqlalchemy.exc

    return isinstance(err, sqlalchemy.exc.SQLAlchemyError | OSError) or (
        err.__cause__ is not None and _is_storage_error(err.__cause__)
    )


# --- the launcher ----------------------------------------------------------------------------


def totals(study: optuna.Study, sweep: SF.Sweep) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    states = [trial_state(t) for t in trials]
    if sweep.method == "grid":
        cells = cell_states(sweep, trials)
        by = [e["state"] for e in cells.values()]
        done = sum(s in DONE_STATES for s in by)
        return {
            "done": done,
            "running": by.count("running"),
            "failed": states.count("failed"),
            "left": by.count("left") + by.count("failed"),
            "cells": len(cells),
        }
    done = sum(s in DONE_STATES for s in states)
    return {
        "done": done,
        "running": states.count("running"),
        "failed": states.count("failed"),
        "left": max(0, sweep.run_cap - done - states.count("running")),
        "cells": sweep.run_cap,
    }


def stale_pending(study: optuna.Study) -> bool:
    """RUNNING trials whose workers died: a run of the command must recover them."""
    return any(
        ST.is_stale(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    )


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


def dry_run(sweep: SF.Sweep, study_name: str, url: str) -> None:
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


def launch(args: argparse.Namespace) -> int:
    sweep = SF.load(args.file)
    study_name = args.study or sweep.name
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
    if args.dry_run:
        dry_run(sweep, study_name, url)
        return 0
    _, invalid = sweep.cells() if sweep.method == "grid" else ([], [])
    if args.workers < 1:
        raise SF.SweepError(f"--workers {args.workers}: give at least 1")
    study = open_study(sweep, url, study_name, create=True)
    study.set_user_attr("sweep.run_cap", sweep.run_cap)
    for cell, why in invalid:
        print(f"skipping invalid cell {SF.cell_id(cell)}: {why}", file=sys.stderr)
    wandb_mode = args.wandb or wandb_log.default_mode()
    before = totals(study, sweep)
    if before["left"] + before["running"] == 0 and not stale_pending(study):
        print(
            f"{study_name}: nothing left to run ({before['done']}/{before['cells']} done, "
            f"{before['failed']} failed trials); storage {url}"
        )
        return 0
    n = len(groups) if gpus else args.workers
    threads = max(1, (os.cpu_count() or 1) // (n * (1 if gpus else k)))
    limit = None
    if args.max_trials is not None:
        limit = len(study.get_trials(deepcopy=False)) + args.max_trials
    status_dir = runs_dir / "workers"
    status_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = groups[i]
        cmd = [
            sys.executable,
            "-m",
            "ablations.sweep",
            args.file,
            "--study",
            study_name,
            "--storage",
            url,
            "--runs-dir",
            str(runs_dir),
            "--worker",
            str(i),
            "--threads",
            str(threads),
            "--wandb",
            wandb_mode,
            "--status",
            str(status_dir / f"worker-{i}.json"),
            "--devices-per-trial",
            str(k),
        ]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        log_path = runs_dir / "logs" / f"worker-{i}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log_file:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT))
    t0 = time.time()
    try:
        _watch(study, sweep, procs, status_dir, t0)
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait()
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    codes = [p.returncode for p in procs]
    final = totals(study, sweep)
    print(
        f"{study_name}: {final['done']}/{final['cells']} done, {final['failed']} failed "
        f"trials, {final['left']} left, {time.time() - t0:.0f} s; storage {url}"
    )
    if any(codes):
        print(f"worker exit codes {codes}; logs in {runs_dir / 'logs'}", file=sys.stderr)
    if final["done"] > before["done"]:
        _closing_table(study, sweep, wandb_mode, runs_dir)
    return 0 if not any(codes) else 1


def _closing_table(study: optuna.Study, sweep: SF.Sweep, mode: str, runs_dir: Path) -> None:
    """The exports under runs/<study>/export, and one `ablation-table` W&B run."""
    from ablations import export

    try:
        export.log_to_wandb(study, sweep, mode, runs_dir)
    except Exception as err:  # the sweep's results are in the study whatever happens here
        print(f"closing export/W&B table failed: {err}", file=sys.stderr)


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


def _watch(study: optuna.Study, sweep: SF.Sweep, procs: list, status_dir: Path, t0: float) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    start_done = totals(study, sweep)["done"]
    last_line = None

    def snapshot():
        tot = totals(study, sweep)
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
        with Live(console=console, refresh_per_second=2) as live:
            while any(p.poll() is None for p in procs):
                tot, eta = snapshot()
                live.update(
                    _render(study.study_name, tot, _worker_lines(status_dir, len(procs)), eta)
                )
                time.sleep(1)
            tot, eta = snapshot()
            live.update(_render(study.study_name, tot, _worker_lines(status_dir, len(procs)), eta))
        return
    # not a terminal (CI, a log file): one line whenever the totals change
    while any(p.poll() is None for p in procs):
        tot, eta = snapshot()
        line = (
            f"{study.study_name}: done {tot['done']} running {tot['running']} "
            f"failed {tot['failed']} left {tot['left']} ETA {eta}"
        )
        if line != last_line:
            print(line, flush=True)
            last_line = line
        time.sleep(2)


# --- status ----------------------------------------------------------------------------------


def _study_and_sweep(
    name: str | None, url: str | None, runs_dir: Path
) -> tuple[optuna.Study, SF.Sweep]:
    if url is None:
        if name is None:
            names = sorted(p.parent.name for p in runs_dir.glob("*/optuna.journal"))
            if len(names) != 1:
                raise SF.SweepError(
                    "name the study: " + (", ".join(names) or f"no studies under {runs_dir}")
                )
            name = names[0]
        url = ST.default_url(name, runs_dir)
        if not Path(url).exists():
            names = sorted(p.parent.name for p in runs_dir.glob("*/optuna.journal"))
            raise SF.SweepError(
                f"no study {name!r} under {runs_dir}; studies there: {', '.join(names) or 'none'}"
            )
    storage = ST.open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not names:
        raise SF.SweepError(f"no studies in {ST.describe_url(url)}")
    if name is None:
        if len(names) != 1:
            raise SF.SweepError(f"name the study: {', '.join(names)}")
        name = names[0]
    if name not in names:
        raise SF.SweepError(
            f"no study {name!r} in {ST.describe_url(url)}; studies there: {', '.join(names)}"
        )
    study = optuna.load_study(study_name=name, storage=storage)
    return study, stored_sweep(study)


def stored_sweep(study: optuna.Study) -> SF.Sweep:
    """The sweep a study was made from, rebuilt from its stored definition."""
    definition = {k: v for k, v in study.user_attrs[DEFINITION_ATTR].items() if v is not None}
    return SF.parse(
        {
            "name": study.user_attrs.get("sweep.name", study.study_name),
            **definition,
            "run_cap": study.user_attrs.get("sweep.run_cap") or 1,
        }
    )


def status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    study, sweep = _study_and_sweep(args.study, args.storage, Path(args.runs_dir))
    tot = totals(study, sweep)
    console = Console(width=160)
    console.print(
        f"{study.study_name}: {tot['done']} done, {tot['running']} running, "
        f"{tot['failed']} failed trials, {tot['left']} left "
        f"(of {tot['cells']} {'cells' if sweep.method == 'grid' else 'trials'})"
    )
    table = Table()
    trials = study.get_trials(deepcopy=False)
    if sweep.method == "grid":
        for col in (*sweep.swept, "state", "trials", "val/error", "test/error"):
            table.add_column(col)
        for entry in cell_states(sweep, trials).values():
            done = [t for t in entry["trials"] if trial_state(t) in DONE_STATES]
            last = done[0] if done else (entry["trials"][-1] if entry["trials"] else None)
            ua = last.user_attrs if last else {}
            table.add_row(
                *(str(entry["cell"][k]) for k in sweep.swept),
                entry["state"],
                ",".join(str(t.number) for t in entry["trials"]),
                _fmt(ua.get("val/error")),
                _fmt(ua.get("test/error")),
            )
    else:
        for col in ("trial", "state", *sweep.swept, "val/error", "test/error"):
            table.add_column(col)
        for t in trials:
            table.add_row(
                str(t.number),
                trial_state(t),
                *(str(t.params.get(k, "")) for k in sweep.swept),
                _fmt(t.user_attrs.get("val/error")),
                _fmt(t.user_attrs.get("test/error")),
            )
    console.print(table)
    return 0


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.2f}"


# --- CLI ---------------------------------------------------------------------------------------


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a sweep file with Optuna (resumable)",
        description="Create or join the study named by the sweep file and run "
        "its trials in worker processes. Run the same command again to resume.",
    )
    p.add_argument("file", help="sweep file (W&B sweep schema), e.g. sweeps/quickstart.yaml")
    p.add_argument("--study", help="study name (default: the file's name)")
    p.add_argument("--storage", help="Optuna storage URL (default runs/<study>/optuna.journal)")
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
    p.add_argument("--max-trials", type=int, default=None, help="start at most this many")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their cost")
    p.add_argument(
        "--wandb",
        choices=wandb_log.MODES,
        default=None,
        help="default: online with W&B credentials, else offline",
    )
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=launch)

    p = sub.add_parser("status", help="a study's totals and its cells by state")
    p.add_argument("study", nargs="?")
    p.add_argument("--storage")
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=status)


if __name__ == "__main__":
    sys.exit(worker_main())
