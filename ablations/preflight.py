"""What `ablate sweep` checks and plans before it starts a worker: the GPUs it may use, what
would fail in every trial (found before any worker starts, and shown by `--dry-run`), and
which worker gets which GPUs and CPU threads."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from ablations.settings import SettingsError, model_spec, resolve
from ablations.study import suggest
from ablations.sweep_file import SpecError, Sweep, SweepError, cell_id


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (taskset, Slurm, cgroups), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def gpus_to_use(devices: str) -> list[str]:
    """GPU indices to pin workers to, listed without initialising CUDA in this process. No GPU
    to list is an error, never a quiet fall back to one CPU worker."""
    visible = visible_gpus()
    if devices == "auto":
        if not visible:
            raise SweepError(
                "--devices auto: no GPU is visible (CUDA_VISIBLE_DEVICES is empty or nvidia-smi "
                "lists none); for CPU workers leave --devices out and give --workers N"
            )
        return visible
    wanted = [d.strip() for d in devices.split(",") if d.strip()]
    unknown = [d for d in wanted if d not in visible]
    if unknown:
        raise SweepError(
            f"--devices {devices}: no GPU {', '.join(unknown)}; visible GPUs: "
            f"{', '.join(visible) or 'none'}"
        )
    return wanted


def visible_gpus() -> list[str]:
    """CUDA_VISIBLE_DEVICES when set (a scheduler's choice), else what nvidia-smi lists; an
    nvidia-smi that is missing, fails or prints something that is not a GPU index is an
    error that quotes it (a driver error line is not a GPU)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    cmd = ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        raise SweepError(
            "--devices: nvidia-smi is not on PATH, so no GPU can be listed; set "
            "CUDA_VISIBLE_DEVICES, or leave --devices out for CPU workers (--workers N)"
        ) from None
    except (OSError, subprocess.SubprocessError) as err:
        raise SweepError(f"--devices: nvidia-smi could not run: {err}") from None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0:
        said = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()[0]
        raise SweepError(f"--devices: nvidia-smi exited {out.returncode}: {said}")
    bad = [line for line in lines if not line.isdigit()]
    if bad:
        raise SweepError(f"--devices: nvidia-smi listed {bad[0]!r}, which is not a GPU index")
    return lines


def preflight(
    sweep: Sweep,
    runs_root: Path,
    *,
    storage_given: bool,
    samples: int = 20,
    devices_per_trial: int = 1,
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
            raise SweepError(
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
            cell = suggest(trial, sweep)
            try:
                resolve({**sweep.base, **cell})
            except (SettingsError, SpecError) as err:
                raise SweepError(
                    f"parameters: a sampled setting is invalid, so trials would fail: {err} "
                    f"(drawn: {cell})"
                ) from None
            cells.append(cell)
            study.tell(trial, 0.0)
    sizes: dict[tuple[str, str], int] = {}
    skipped = []
    for cell in cells or [{}]:
        settings = resolve({**sweep.base, **cell})
        k, batch = devices_per_trial, settings["train.batch_size"]
        if batch % k:
            raise SweepError(
                f"--devices-per-trial {k}: train.batch_size {batch} is not a multiple of {k}; "
                "each rank takes an equal share of a step's images, so that the trial is the "
                "same experiment at any number of ranks"
            )
        dataset, folder = settings["data.dataset"], settings["data.dir"]
        if (dataset, folder) not in sizes:
            try:
                raw = DATASETS[dataset](Path(folder).expanduser(), True)
            except DataError as err:
                raise SweepError(f"data: {err}") from None
            sizes[(dataset, folder)] = len(raw.train_y)
        try:
            split_sizes(
                sizes[(dataset, folder)], settings["data.val_size"], settings["data.subset"]
            )
        except DataError as err:
            if sweep.method != "grid":
                raise SweepError(f"data: {err}") from None
            skipped.append((cell, str(err)))
    if sweep.method == "grid" and cells and len(skipped) == len(cells):
        raise SweepError(f"every grid cell fails its data split: {skipped[0][1]}")
    return skipped


def dry_run(
    sweep: Sweep,
    study_name: str,
    url: str,
    skipped: list | None = None,
    *,
    workers: int = 1,
    threads: int = 1,
    use_cuda: bool = False,
    study: Any = None,
) -> None:
    """The cells and their cost: what `--dry-run` prints (ablations/estimate.py)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    if sweep.method != "grid":
        console.print(
            f"{study_name}: {sweep.method} search, run_cap {sweep.run_cap} trials, "
            f"up to {sweep.epochs({})} epochs each, storage {url}"
        )
        _print_estimate(
            sweep, [{}] * (sweep.run_cap or 1), workers=workers, threads=threads,
            use_cuda=use_cuda, study=None,
            note="parameters are drawn as the sweep runs: estimated from its base settings",
        )  # fmt: skip
        return
    valid, invalid = sweep.cells()
    bad = {cell_id(c) for c, _ in skipped or []}
    valid = [c for c in valid if cell_id(c) not in bad]
    invalid = [*invalid, *(skipped or [])]
    table = Table(title=f"{study_name}: {len(valid)} cells ({url})")
    table.add_column("#", justify="right")
    for key in sweep.swept:
        table.add_column(key)
    table.add_column("model.name")
    table.add_column("epochs", justify="right")
    epochs = 0
    for i, cell in enumerate(valid):
        flat = resolve({**sweep.base, **cell})
        name = model_spec(flat).name
        e = sweep.epochs(cell)
        epochs += e
        table.add_row(str(i), *(str(cell[k]) for k in sweep.swept), name, str(e))
    console.print(table)
    for cell, why in invalid:
        print(f"skipped invalid cell {cell_id(cell)}: {why}")
    print(f"{len(valid)} cells to run, {len(invalid)} invalid skipped, {epochs} epochs in all")
    _print_estimate(sweep, valid, workers=workers, threads=threads, use_cuda=use_cuda, study=study)


def _print_estimate(sweep: Sweep, cells: list, *, note: str | None = None, **kw: Any) -> None:
    from ablations.estimate import estimate

    try:
        lines = estimate(sweep, cells, **kw)
    except (SettingsError, OSError, ValueError) as err:
        print(f"no cost estimate: {type(err).__name__}: {err}")
        return
    if note:
        lines.insert(1, f"  ({note})")
    print("\n".join(lines))


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
