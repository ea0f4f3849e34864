"""What a sweep will cost before it starts (`ablate sweep FILE --dry-run`): each distinct model
is built with its cell's data and timed for a few training and evaluation steps on the device
the workers would use, with a worker's share of the CPU threads; an epoch is then its training
batches plus its validation pass, a cell its epochs, and the wall time the cells spread over
the workers. For a study that has run, the cells done and the epochs its interrupted trials'
checkpoints hold are taken off.

It is an estimate: no compilation, no data-loader or logging time, and a machine loaded by
something else runs slower. `benchmarks/` measures the pipeline itself.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STEPS = 5  # timed training steps per model (their median), after two untimed (allocation,
# kernel choice)


@dataclass(frozen=True)
class ModelCost:
    """Seconds a worker spends per training batch and per evaluated image, and how many
    images an epoch trains and evaluates, for one model on its cell's data."""

    name: str
    train_step_s: float
    eval_image_s: float
    train_batches: int
    eval_images: int
    device: str

    @property
    def epoch_s(self) -> float:
        return self.train_step_s * self.train_batches + self.eval_image_s * self.eval_images


@dataclass
class Line:
    name: str
    cost: ModelCost
    cells: int = 0
    epochs: int = 0
    left_epochs: int = 0
    extra: list[str] = field(default_factory=list)


def time_model(settings: dict[str, Any], threads: int, use_cuda: bool) -> ModelCost:
    """A few timed steps of the cell's model, as a worker trains it (its precision, batch size
    and threads), on random batches shaped as its data."""
    import torch
    import torch.nn.functional as F

    from ablations import run
    from lightning_modules.precision import resolve_precision

    torch.set_num_threads(threads)
    prepared = run.prepare(settings, download=False)
    dm, module = prepared.dm, prepared.module
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = resolve_precision(settings["train.precision"], device.type)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    net = module.net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x_train, _ = dm.splits["train"]
    batch = settings["train.batch_size"]
    eval_batch = settings["train.eval_batch_size"]
    shape = tuple(x_train.shape[1:])
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, dm.num_classes, (batch,), device=device)
    xe = torch.randn(eval_batch, *shape, device=device)

    def sync() -> None:
        if use_cuda:
            torch.cuda.synchronize()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def evaluate() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            net(xe)

    def seconds(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    net.train()
    step()
    step()
    train_step = statistics.median(seconds(step) for _ in range(STEPS))
    net.eval()
    evaluate()
    eval_image = min(seconds(evaluate) for _ in range(2)) / eval_batch
    n_train = len(dm.splits["train"][1])
    return ModelCost(
        name=prepared.flat["model.name"],
        train_step_s=train_step,
        eval_image_s=eval_image,
        train_batches=max(1, n_train // batch),
        eval_images=len(dm.splits["val"][1]),
        device=run.device_name("gpu" if use_cuda else "cpu"),
    )


def epochs_left(sweep, study, cells: list[dict[str, Any]]) -> dict[str, int]:
    """Per cell id, the epochs still to train: none for a cell done, its epochs less those
    its interrupted trial's newest checkpoint holds for one to be continued."""
    from ablations.resume import candidates, epochs_in
    from ablations.study import study_cells
    from ablations.sweep_file import cell_id

    left = {cell_id(c): sweep.epochs(c) for c in cells}
    if study is None:
        return left
    for cid, entry in study_cells(study, sweep).items():
        if cid not in left:
            continue
        if entry.state not in ("left", "running"):  # done, or given up
            left[cid] = 0
            continue
        newest = max(entry.trials, key=lambda t: t.number, default=None)
        run_dir = newest.user_attrs.get("run_dir") if newest is not None else None
        found = candidates(Path(run_dir)) if run_dir else []
        if found:
            left[cid] -= min(left[cid], epochs_in(found[0], sweep.epochs(entry.cell)))
    return left


def hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(
    sweep,
    cells: list[dict[str, Any]],
    *,
    workers: int,
    threads: int,
    use_cuda: bool,
    study=None,
    timer=time_model,
) -> list[str]:
    """The lines `--dry-run` prints: per distinct model, then in total, then what is left."""
    from ablations.settings import resolve
    from ablations.sweep_file import cell_id

    left = epochs_left(sweep, study, cells)
    lines: dict[tuple, Line] = {}
    for cell in cells:
        settings = resolve({**sweep.base, **cell})
        key = tuple(
            sorted(
                (k, str(v))
                for k, v in settings.items()
                if k.startswith(("model.", "data.")) or k in ("train.batch_size", "train.precision")
            )
        )
        if key not in lines:
            cost = timer(settings, threads, use_cuda)
            lines[key] = Line(cost.name, cost)
        line = lines[key]
        line.cells += 1
        line.epochs += sweep.epochs(cell)
        line.left_epochs += left[cell_id(cell)]
    if not lines:
        return ["nothing to estimate: no cell to run"]
    device = next(iter(lines.values())).cost.device
    out = [
        f"estimated training time here ({device}, {threads} thread(s) per worker, "
        f"{workers} worker(s); the median of {STEPS} timed steps per model):"
    ]
    width = max(len(line.name) for line in lines.values())
    out.append(f"  {'model':<{width}}  cells  epochs  per epoch  training")
    total = left_total = 0.0
    for line in lines.values():
        seconds = line.cost.epoch_s * line.epochs
        total += seconds
        left_total += line.cost.epoch_s * line.left_epochs
        out.append(
            f"  {line.name:<{width}}  {line.cells:>5}  {line.epochs:>6}  "
            f"{line.cost.epoch_s:>7.0f} s  {hours(seconds):>8}"
        )
    n = len(cells)
    par = min(workers, n)
    out.append(
        f"total: {n} cells, {sum(x.epochs for x in lines.values())} epochs, "
        f"{hours(total)} of training; about {hours(total / par)} with {par} worker(s)"
    )
    if study is not None and left_total < total:
        done = sum(1 for v in left.values() if v == 0)
        out.append(
            f"left in study {study.study_name}: {sum(x.left_epochs for x in lines.values())} "
            f"epochs ({done} cells done, the rest from their checkpoints), {hours(left_total)} "
            f"of training; about {hours(left_total / par)} with {par} worker(s)"
        )
    return out
