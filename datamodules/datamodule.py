"""One LightningDataModule for every dataset: load, split, preprocess, put on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from datamodules.loader import AUGMENTATIONS, DeviceLoader
from datamodules.preprocess import PREPROCESSING, cache_key, fitted_stats
from datamodules.sources import SOURCES, DataError, RawData

DATASETS = SOURCES
VAL_AUTO_FRACTION, VAL_AUTO_MAX = 0.1, 5000


def _choose(table: dict, key: str, value: str) -> None:
    if value not in table:
        raise DataError(f"{key}={value!r} is not one of the valid values: {', '.join(table)}")


def stratified_take(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick n indices with the class proportions of `labels`; returns (taken, rest), sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    quota = np.floor(exact).astype(int)
    # largest remainders get the leftover images, ties broken by class order
    leftover = n - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    taken = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    taken = np.sort(np.concatenate(taken)) if taken else np.array([], dtype=int)
    rest = np.setdiff1d(np.arange(len(labels)), taken)
    return taken, rest


def split_sizes(n_train: int, val_size: int | str, subset: int | None) -> tuple[int, int]:
    """(validation images, training images) after `data.val_size` and `data.subset`."""
    if subset is not None and subset < 1:
        raise DataError(f"data.subset={subset} must be at least 1")
    if val_size == "auto":
        pool = min(subset, n_train) if subset is not None else n_train
        val = min(VAL_AUTO_MAX, round(VAL_AUTO_FRACTION * pool))
    else:
        val = int(val_size)
    if val < 0 or val >= n_train:
        raise DataError(
            f"data.val_size={val_size} must be between 0 and {n_train - 1} "
            f"(the training set has {n_train} images)"
        )
    left = n_train - val
    if subset is not None and subset > left:
        raise DataError(
            f"data.subset={subset} is larger than the {left} training images "
            f"left after data.val_size={val}"
        )
    return val, subset if subset is not None else left


class AllConvDataModule(L.LightningDataModule):
    """Chosen by `data.dataset`; `load()` runs on the CPU, `setup()` moves to the device."""

    def __init__(
        self,
        data: dict[str, Any],
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        download: bool = True,
    ) -> None:
        super().__init__()
        self.data = dict(data)
        self.seed = seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.download = download
        _choose(DATASETS, "data.dataset", data["dataset"])
        _choose(PREPROCESSING, "data.preprocess", data["preprocess"])
        _choose(AUGMENTATIONS, "data.augment", data["augment"])
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cpu")

    @property
    def root(self) -> Path:
        return Path(str(self.data["dir"])).expanduser()

    def load(self) -> None:
        """Read, split and preprocess on the CPU (once); sets shape, classes and files."""
        if self.splits is not None:
            return
        raw: RawData = DATASETS[self.data["dataset"]](self.root, self.download)
        n_val, n_sub = split_sizes(len(raw.train_y), self.data["val_size"], self.data["subset"])
        val_idx, train_idx = stratified_take(raw.train_y, n_val, self.seed)
        if n_sub < len(train_idx):
            keep, _ = stratified_take(raw.train_y[train_idx], n_sub, self.seed + 1)
            train_idx = train_idx[keep]
        train_x = torch.from_numpy(np.ascontiguousarray(raw.train_x[train_idx]))
        name = self.data["preprocess"]
        key = cache_key(
            dataset=self.data["dataset"],
            files=raw.files,
            n=len(raw.train_y),
            val=n_val,
            subset=n_sub,
            seed=self.seed,
            preprocess=name,
            shape=list(raw.train_x.shape),
        )
        self.stats, self.stats_source = fitted_stats(name, train_x, self.root / "cache", key)
        apply = PREPROCESSING[name][1]

        def prep(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            t = apply(torch.from_numpy(np.ascontiguousarray(x)), self.stats)
            # NHWC memory viewed as NCHW: the channels-last layout, with no copy
            return t.permute(0, 3, 1, 2), torch.from_numpy(y).long()

        self.splits = {
            "train": prep(raw.train_x[train_idx], raw.train_y[train_idx]),
            "val": prep(raw.train_x[val_idx], raw.train_y[val_idx]),
            "test": prep(raw.test_x, raw.test_y),
        }
        _, h, w, c = raw.train_x.shape
        if h != w:
            raise DataError(
                f"{self.data['dataset']}: images are {h}x{w}; only square ones are supported"
            )
        self.in_channels, self.in_size = c, h
        self.num_classes = len(raw.class_names)
        self.class_names = raw.class_names
        self.files = raw.files

    def setup(self, stage: str | None = None) -> None:
        self.load()
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.device = trainer.strategy.root_device
            self.rank, self.world_size = trainer.global_rank, trainer.world_size
        if self.splits["train"][0].device != self.device:
            self.splits = {
                k: (x.to(self.device), y.to(self.device)) for k, (x, y) in self.splits.items()
            }

    def train_dataloader(self) -> DeviceLoader:
        x, y = self.splits["train"]
        return DeviceLoader(
            x,
            y,
            self.batch_size,
            shuffle=True,
            augment=self.data["augment"],
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _eval_loader(self, split: str) -> DeviceLoader:
        x, y = self.splits[split]
        return DeviceLoader(x, y, self.eval_batch_size, rank=self.rank, world_size=self.world_size)

    def val_dataloader(self) -> DeviceLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DeviceLoader:
        return self._eval_loader("test")
