"""Loader images/s: the device loader with flip-translate against a torchvision DataLoader with
PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize).

    python -m benchmarks.loader [--repeats 5]

Each side hands out training batches of 128 for whole epochs over the same 8000 synthetic
images, interleaved in one process. The DataLoader's workers are persistent and its first
epoch is not timed, so worker start-up is not counted against it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks import common
from benchmarks.throughput import ImageArray, cifar_transforms
from datamodules import AllConvDataModule, DeviceLoader, make_synthetic

TARGET = 10.0
BATCH = 128


def device_loader_ips(loader: DeviceLoader, epochs: int) -> float:
    """Images/s over whole epochs; the first is a warm-up."""
    for _ in loader:
        pass
    common.sync(loader.x.device)
    t0 = time.perf_counter()
    images = 0
    for _ in range(epochs):
        for xb, _ in loader:
            images += len(xb)
    common.sync(loader.x.device)
    return images / (time.perf_counter() - t0)


def dataloader_ips(loader: DataLoader, device: str) -> float:
    """Images/s over one epoch, moved to the device as a training loop would."""
    t0 = time.perf_counter()
    images = 0
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        images += len(xb)
    common.sync(device)
    return images / (time.perf_counter() - t0)


def device_loader(
    device: str, root: Path, augment: str = "flip-translate"
) -> tuple[DeviceLoader, Any]:
    """The pipeline's own training loader on synthetic data, and its datamodule."""
    dm = AllConvDataModule(
        {
            "dataset": "synthetic",
            "dir": str(root),  # where the fitted statistics are cached
            "preprocess": "standardize",
            "augment": augment,
            "val_size": 0,
            "subset": None,
        },
        batch_size=BATCH,
    )
    dm.load()
    dm.device = torch.device(device)
    dm.setup()
    return dm.train_dataloader(), dm


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device-epochs", type=int, default=5, help="epochs per device-loader run")
    args = p.parse_args(argv)
    return common.in_scratch(run_benchmark, args, "loader")


def run_benchmark(args, root: Path) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loader, _ = device_loader(device, root)
    raw = make_synthetic()
    images, labels = raw.train_x, raw.train_y
    mean = (images.reshape(-1, 3).mean(0) / 255).tolist()
    std = (images.reshape(-1, 3).std(0) / 255).tolist()
    dataset = ImageArray(images, labels, cifar_transforms(mean, std))
    pin = device == "cuda"
    torchvision_loaders = {
        workers: DataLoader(
            dataset,
            batch_size=BATCH,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin,
        )
        for workers in (0, 2)
    }
    for tv in torchvision_loaders.values():  # warm-up epoch: starts the persistent workers
        dataloader_ips(tv, device)

    print(f"loader: {len(loader.x)} images, batch {BATCH}, on {device}")
    sides = {
        "device_loader flip-translate": lambda: device_loader_ips(loader, args.device_epochs),
        **{
            f"torchvision num_workers={w}": (lambda tv=tv: dataloader_ips(tv, device))
            for w, tv in torchvision_loaders.items()
        },
    }
    ips = common.interleaved(sides, args.repeats)
    dev = ips["device_loader flip-translate"]
    ratios = {
        f"device_vs_torchvision_num_workers={w}": common.spread(
            [a / b for a, b in zip(dev, ips[f"torchvision num_workers={w}"])], 2
        )
        for w in torchvision_loaders
    }
    worst = min(r["median"] for r in ratios.values())
    figures = {
        "images_per_second": {k: common.spread(v, 0) for k, v in ips.items()},
        **ratios,
        "target_ratio": TARGET,
        "met": worst >= TARGET,
    }
    used = {
        "device": device,
        "images": len(loader.x),
        "batch_size": BATCH,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "device_epochs_per_repeat": args.device_epochs,
        "device_loader": "DeviceLoader(shuffle=True, augment='flip-translate'), as "
        "AllConvDataModule.train_dataloader builds it",
        "torchvision": "DataLoader(shuffle=True, persistent_workers when num_workers > 0, "
        f"pin_memory={pin}) over PIL images: RandomCrop(32, padding=4), RandomHorizontalFlip, "
        "ToTensor, Normalize; first epoch untimed",
    }
    path = common.write_result("loader", figures, used, args.out)
    print(f"device loader vs torchvision: worst median ratio {worst:.1f}x; wrote {path}")
    return figures


if __name__ == "__main__":
    main()
