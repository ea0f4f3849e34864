"""Training images/s: the pipeline as `ablate train` runs it, side by side with a bare PyTorch
loop and with what a typical Lightning user writes.

    python -m benchmarks.throughput [--repeats 5 --steps 10]

Three groups, each interleaved in this one process (see common.interleaved):
  targets  the pipeline (ablations.run.train: Trainer, CSVLogger, checkpoint, progress bar)
           against the bare loop at the same model, precision and memory format (>= 0.90),
           and against the typical Lightning user (fp32, NCHW, PIL transforms) (>= 1.8x);
  factors  the bare loop with each of precision and memory format switched, which is what
           justifies `train.precision=auto` and channels-last;
  eval     evaluation as the pipeline runs it (no gradients, batch 1024) against batch 128
           with gradients on.
Every figure is steady state: the first `warmup` steps of each run are not timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ablations import run
from benchmarks import common
from datamodules import make_synthetic
from lightning_modules.family import ModelSpec
from lightning_modules.net import build
from lightning_modules.precision import resolve_precision

TARGET_VS_BARE = 0.90
TARGET_VS_TYPICAL = 1.8
TYPICAL_WORKERS = 2  # the PyTorch CIFAR-10 tutorial's choice, and this machine's core count


# --- what a typical Lightning user writes --------------------------------------------------


class ImageArray(Dataset):
    """uint8 HWC images handed out as PIL images, exactly as torchvision's CIFAR10 does."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def cifar_transforms(mean: list[float], std: list[float]) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


class TypicalModule(L.LightningModule):
    """The Lightning docs' classifier: fp32, the default (NCHW) layout, loss logged per step."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.net = build(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)


def typical_user(spec: ModelSpec, raw, n: int, warmup: int, root: Path) -> float:
    images, labels = raw.train_x[:n], raw.train_y[:n]
    mean = (images.reshape(-1, 3).mean(0) / 255).tolist()
    std = (images.reshape(-1, 3).std(0) / 255).tolist()
    loader = DataLoader(
        ImageArray(images, labels, cifar_transforms(mean, std)),
        batch_size=128,
        shuffle=True,
        num_workers=TYPICAL_WORKERS,
    )
    clock = common.StepClock(warmup)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="auto",
        devices=1,
        logger=CSVLogger(root, name="typical"),
        callbacks=[clock],
        default_root_dir=root,
    )
    trainer.fit(TypicalModule(spec), loader)
    return clock.images_per_second


# --- the benchmark ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    p.add_argument("--typical-every", type=int, default=2, help="the slow baseline's repeats")
    p.add_argument("--typical-steps", type=int, default=4)
    p.add_argument("--overhead-steps", type=int, default=150)
    p.add_argument("--factor-repeats", type=int, default=2)
    p.add_argument("--factor-steps", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=1024)
    args = p.parse_args(argv)
    return common.in_scratch(run_benchmark, args, "throughput")


def run_benchmark(args, root: Path) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_train = 128 * (args.warmup + max(args.steps, args.typical_steps))
    settings = common.resolved(
        {
            "data.augment": "flip-translate",
            "data.subset": n_train,
            "train.epochs": 1,
            "data.dir": str(root / "data"),
        }
    )
    dm, module, _ = run.prepare(settings)
    spec = module.spec
    precision = resolve_precision(settings["train.precision"], device)
    x, y = (t.to(device) for t in dm.splits["train"])
    raw = make_synthetic()
    runs = iter(range(10**6))

    def pipeline(s: dict[str, Any] = settings, progress: bool = True) -> Callable[[], float]:
        def side() -> float:
            clock = common.StepClock(args.warmup)
            run.train(s, root / f"pipeline-{next(runs)}", callbacks=[clock], progress=progress)
            return clock.images_per_second

        return side

    def bare(
        precision: str = precision,
        channels_last: bool = True,
        steps: int = args.steps,
        warmup: int = args.warmup,
        model: ModelSpec = spec,
        batch_size: int = 128,
    ) -> Callable[[], float]:
        return lambda: common.bare_train(
            model,
            x,
            y,
            batch_size=batch_size,
            steps=steps,
            warmup=warmup,
            precision=precision,
            channels_last=channels_last,
            augment="flip-translate",
        )

    def typical() -> float:
        n = 128 * (args.warmup + args.typical_steps)
        return typical_user(spec, raw, n, args.warmup, root / f"typical-{next(runs)}")

    print(
        f"throughput: All-CNN-C width 1.0, batch 128, {precision}, on {device}, "
        f"{torch.get_num_threads()} threads"
    )
    print("targets: the pipeline, the bare loop, the typical Lightning user")
    targets = common.interleaved(
        {"pipeline": pipeline(), "bare": bare(), "typical": typical},
        args.repeats,
        every={"typical": args.typical_every},
    )
    vs_bare = common.ratios(targets["pipeline"], targets["bare"])
    vs_typical = common.ratios(targets["pipeline"], targets["typical"])

    # The same paths with a net too small to cost anything (width 0.02, batch 8): what is
    # left per step is the framework's own time, the figure that matters where a step takes
    # a few ms (a GPU). "pipeline quiet" is run.train as sweep trials call it, no progress bar.
    print("overhead: the pipeline and the bare loop at model.width=0.02, batch 8")
    tiny_steps, tiny_batch = args.overhead_steps, 8
    tiny = common.resolved(
        {
            **settings,
            "model.width": 0.02,
            "train.batch_size": tiny_batch,
            "data.subset": tiny_batch * (args.warmup + tiny_steps),
        }
    )
    tiny_spec = replace(spec, width=0.02)
    small = common.interleaved(
        {
            "pipeline": pipeline(tiny),
            "pipeline quiet": pipeline(tiny, progress=False),
            "bare": bare(steps=tiny_steps, model=tiny_spec, batch_size=tiny_batch),
        },
        args.repeats,
    )
    ms = {k: tiny_batch * 1e3 / common.median([v for v in vs if v]) for k, vs in small.items()}

    print("factors: the bare loop with precision or memory format switched")
    fp32 = "32-true"
    steps, warm = args.factor_steps, 1
    factors = common.interleaved(
        {
            f"{precision} channels_last": bare(steps=steps, warmup=warm),
            f"{precision} nchw": bare(channels_last=False, steps=steps, warmup=warm),
            f"{fp32} channels_last": bare(fp32, steps=steps, warmup=warm),
            f"{fp32} nchw": bare(fp32, False, steps=steps, warmup=warm),
        },
        args.factor_repeats,
    )

    print("eval: no gradients at batch 1024 (the pipeline), at 128, and 128 with gradients")
    net = build(spec).to(device).to(memory_format=torch.channels_last)
    xe, ye = x[: args.eval_images], y[: args.eval_images]
    evals = common.interleaved(
        {
            "no_grad batch 1024": lambda: common.eval_images_per_second(
                net, xe, ye, batch_size=1024, precision=precision
            ),
            "no_grad batch 128": lambda: common.eval_images_per_second(
                net, xe, ye, batch_size=128, precision=precision
            ),
            "grad batch 128": lambda: common.eval_images_per_second(
                net, xe, ye, batch_size=128, precision=precision, grad=True
            ),
        },
        args.factor_repeats,
    )

    figures = {
        "images_per_second": {k: common.spread(v) for k, v in targets.items()},
        "pipeline_vs_bare": common.spread(vs_bare, 3),
        "pipeline_vs_typical": common.spread(vs_typical, 3),
        "target_pipeline_vs_bare": TARGET_VS_BARE,
        "target_pipeline_vs_typical": TARGET_VS_TYPICAL,
        "met_pipeline_vs_bare": common.median(vs_bare) >= TARGET_VS_BARE,
        "met_pipeline_vs_typical": common.median(vs_typical) >= TARGET_VS_TYPICAL,
        "overhead_width_0.02_batch_8": {
            "images_per_second": {k: common.spread(v) for k, v in small.items()},
            "ms_per_step": {k: round(v, 2) for k, v in ms.items()},
            "pipeline_overhead_ms_per_step": round(ms["pipeline"] - ms["bare"], 2),
            "pipeline_quiet_overhead_ms_per_step": round(ms["pipeline quiet"] - ms["bare"], 2),
        },
        "factors_bare_images_per_second": {k: common.spread(v) for k, v in factors.items()},
        "eval_images_per_second": {k: common.spread(v) for k, v in evals.items()},
    }
    used = {
        "device": device,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "model": asdict(spec),
        "batch_size": 128,
        "augment": "flip-translate",
        "repeats": args.repeats,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "typical_every": args.typical_every,
        "typical_timed_steps": args.typical_steps,
        "overhead_timed_steps": tiny_steps,
        "factor_repeats": args.factor_repeats,
        "factor_timed_steps": args.factor_steps,
        "factor_warmup_steps": 1,
        "eval_images": len(xe),
        "pipeline": "ablations.run.train (as `ablate train`): Trainer with CSVLogger, "
        "ModelCheckpoint, EpochRecorder, progress bar; images/s over its training batches "
        "after the warm-up (benchmarks.common.StepClock)",
        "bare": "benchmarks.common.bare_train: the same net, SGD, autocast and channels-last, "
        "batches from the same DeviceLoader",
        "typical": f"TypicalModule under a default Trainer: fp32, NCHW, DataLoader over PIL "
        f"images with RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, "
        f"num_workers={TYPICAL_WORKERS}",
        "run_settings": settings,
    }
    path = common.write_result("throughput", figures, used, args.out)
    print(
        f"pipeline/bare {figures['pipeline_vs_bare']['median']}, pipeline/typical "
        f"{figures['pipeline_vs_typical']['median']}, framework overhead "
        f"{figures['overhead_width_0.02_batch_8']['pipeline_overhead_ms_per_step']} ms/step; "
        f"wrote {path}"
    )
    return figures


if __name__ == "__main__":
    main()
