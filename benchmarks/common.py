"""What the benchmarks share: the machine's description, the result file, the clocks, and the
bare PyTorch loop that the pipeline is measured against."""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from ablations import settings
from ablations.provenance import git_commit
from datamodules import DeviceLoader
from lightning_modules.family import ModelSpec
from lightning_modules.net import build

RESULTS = Path(__file__).resolve().parent / "results"

# All-CNN-C at width 1.0 on synthetic 32x32x3 data: the model and input the figures are about.
# `standardize` (not the paper's GCN+ZCA) because its fit is instant; what the net sees per
# step, a float32 32x32x3 tensor, is the same either way, and so is the step's cost.
ALL_CNN_C = {
    "data.dataset": "synthetic",
    "data.preprocess": "standardize",
    "model.base": "C",
    "model.variant": "all-cnn",
    "model.width": 1.0,
    "train.batch_size": 128,
}

# the precisions `train.precision=auto` resolves to (16-mixed would need a GradScaler)
AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """The machine and software the figures came from."""
    info = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
    }
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        pass
    return info


def write_result(
    name: str, figures: dict[str, Any], settings: dict[str, Any], out_dir: Path | None = None
) -> Path:
    """`<out_dir>/<name>.json`: figures, the settings that made them, and the machine."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    doc = {"benchmark": name, "figures": figures, "settings": settings, "machine": machine()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float | None], digits: int = 1) -> dict[str, Any]:
    """Median, min, max and every repeat: the spread is part of the figure."""
    xs = [x for x in xs if x is not None]
    return {
        "median": round(median(xs), digits),
        "min": round(min(xs), digits),
        "max": round(max(xs), digits),
        "repeats": [round(x, digits) for x in xs],
    }


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def resolved(overrides: dict[str, Any]) -> dict[str, Any]:
    return settings.resolve({**ALL_CNN_C, **overrides})


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.json")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every side (default: torch's, one per core); 1 keeps a "
        "shared, busy machine from stalling every parallel op on a busy core",
    )
    return p


def interleaved(
    sides: dict[str, Callable[[], float]],
    repeats: int,
    *,
    every: dict[str, int] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[float | None]]:
    """Run every side once per repeat, alternating the order, so load that comes and goes
    (other processes on a shared machine) falls on all sides alike. A side in `every` runs
    only on every n-th repeat (a slow baseline); its other repeats hold None."""
    out: dict[str, list[float | None]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            if r % (every or {}).get(name, 1):
                out[name].append(None)
                continue
            value = sides[name]()
            out[name].append(value)
            log(f"  repeat {r + 1}/{repeats} {name}: {value:.1f}")
    return out


def ratios(a: list[float | None], b: list[float | None]) -> list[float]:
    """a / b for the repeats where both ran."""
    return [x / y for x, y in zip(a, b) if x is not None and y is not None]


def set_threads(n: int | None) -> None:
    """Torch's intra-op threads for this process (all sides alike); None keeps the default."""
    if n:
        torch.set_num_threads(n)


def in_scratch(run, args, name: str) -> dict[str, Any]:
    """run(args, folder) with the torch threads set and a scratch folder removed afterwards."""
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        return run(args, Path(tmp))


# --- the steady-state clock for a Lightning fit -----------------------------------------------


class StepClock(Callback):
    """Images/s over the training batches after the first `warmup`, across epochs, not
    counting validation. It syncs the device only where it reads the clock (after the warm-up,
    at epoch start, after each epoch's last batch), never per step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seen = 0
        self.images = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.seen >= self.warmup:
            sync(pl_module.device)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self._t0 is not None:
            self.images += len(batch[1])
        if self.seen == self.warmup:
            sync(pl_module.device)
            self._t0 = time.perf_counter()
        elif self._t0 is not None and batch_idx == trainer.num_training_batches - 1:
            sync(pl_module.device)
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


# --- the bare loop -----------------------------------------------------------------------------


def forever(loader: DeviceLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch after epoch; a plain DeviceLoader draws a new order each time it is iterated."""
    return itertools.chain.from_iterable(itertools.repeat(loader))


def bare_train(
    spec: ModelSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    precision: str,
    channels_last: bool = True,
    augment: str = "none",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    compile: bool = False,
    seed: int = 0,
) -> float:
    """Training images/s of the loop a PyTorch user writes for speed: the data on the device,
    the same net, SGD, autocast and memory format as the pipeline, nothing else per step."""
    if warmup < 1 or steps < 1:
        raise ValueError("bare_train needs at least one warm-up and one timed step")
    device = x.device
    torch.manual_seed(seed)
    net = build(spec).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile:
        net = torch.compile(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = DeviceLoader(
        x, y, batch_size, shuffle=True, augment=augment, seed=seed, channels_last=channels_last
    )
    dtype = AUTOCAST[precision]
    t0 = 0.0
    net.train()
    for i, (xb, yb) in enumerate(forever(loader)):
        if not channels_last:
            xb = xb.contiguous()  # flip_translate hands out channels-last
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == warmup - 1:
            sync(device)
            t0 = time.perf_counter()
        elif i == warmup + steps - 1:
            sync(device)
            return steps * batch_size / (time.perf_counter() - t0)
    raise AssertionError("unreachable")


def eval_images_per_second(
    net: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    precision: str,
    grad: bool = False,
    passes: int = 1,
) -> float:
    """Images/s of a forward pass over (x, y) in eval mode, as validation runs it
    (Lightning validates under inference_mode) or, with grad=True, as a naive loop would."""
    device = x.device
    dtype = AUTOCAST[precision]
    loader = DeviceLoader(x, y, batch_size)
    net.eval()
    ctx = torch.enable_grad if grad else torch.inference_mode

    def one_pass() -> None:
        for xb, yb in loader:
            with ctx(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                F.cross_entropy(net(xb).float(), yb)

    one_pass()  # warm-up: kernels and, under cudnn.benchmark, the algorithm search
    sync(device)
    t0 = time.perf_counter()
    for _ in range(passes):
        one_pass()
    sync(device)
    net.train()
    return passes * len(x) / (time.perf_counter() - t0)
