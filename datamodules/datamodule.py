"""One LightningDataModule for every dataset: load, split, preprocess, put on the device."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from datamodules.loader import AUGMENTATIONS, DeviceLoader
from datamodules.preprocess import CACHE_VERSION, PREPROCESSING, cache_key, fitted_stats
from datamodules.sources import SOURCES, DataError, RawData
from datamodules.splits import split_sizes, stratified_take

DATASETS = SOURCES


def _fingerprint(file: str) -> list:
    """A file's path, size and modification time: a replaced dataset file changes it."""
    try:
        st = os.stat(file)
    except OSError:  # not a file (synthetic data names its generator)
        return [file]
    return [file, st.st_size, st.st_mtime_ns]


def _choose(table: dict, key: str, value: str) -> None:
    if value not in table:
        raise DataError(f"{key}={value!r} is not one of the valid values: {', '.join(table)}")


_last_raw: tuple[tuple, RawData] | None = None


def read_raw(dataset: str, root: Path, download: bool) -> RawData:
    """The raw images of a data set, kept for the next run in this process: a sweep worker's
    trials share their data set, and reading it again (Fashion-MNIST's gzip, 0.5 s) or
    drawing it again (synthetic, 3 s) was most of a short trial's fixed cost. Keyed by the
    resolved folder, read through the folder as given (messages name it so). Callers index
    or copy the arrays, never write to them."""
    global _last_raw
    key = (dataset, str(root.resolve()), download)
    if _last_raw is None or _last_raw[0] != key:
        _last_raw = None
        _last_raw = (key, DATASETS[dataset](root, download))
    return _last_raw[1]


def forget_raw() -> None:
    global _last_raw
    _last_raw = None


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
        self.stats: dict[str, torch.Tensor] | None = None
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cpu")

    def __getstate__(self) -> dict[str, Any]:
        """What a spawned DDP rank receives: the settings and the fitted statistics as numpy
        arrays, which pickle through the pipe, not the images. Tensors would travel through
        /dev/shm (CIFAR-10 after GCN + ZCA is about 0.8 GB, for fit and again for test, per
        concurrent trial; a container's default is 64 MB); each rank reads its data set
        again and applies the same statistics (`load`)."""
        state = self.__dict__.copy()
        state["splits"] = None
        if self.stats is not None:
            stats = {k: v.detach().cpu().numpy() for k, v in self.stats.items()}
            state["stats"], state["_carried"] = None, (stats, self.stats_source)
        return state

    @property
    def root(self) -> Path:
        return Path(str(self.data["dir"])).expanduser()

    def load(self, stats: dict[str, torch.Tensor] | None = None) -> None:
        """Read, split and preprocess on the CPU (once); sets shape, classes and files.
        `stats`: preprocessing statistics to use instead of the fitted ones (a checkpoint's)."""
        if self.splits is not None:
            return
        carried, source = self.__dict__.pop("_carried", None) or (None, None)
        if stats is None and carried is not None:  # a spawned rank: its parent's statistics
            stats = {k: torch.from_numpy(v) for k, v in carried.items()}
        dataset, name = self.data["dataset"], self.data["preprocess"]
        raw = read_raw(dataset, self.root, self.download)
        _, h, w, c = raw.train_x.shape
        if h != w:
            raise DataError(f"{dataset}: images are {h}x{w}; only square ones are supported")
        n_val, n_sub = split_sizes(len(raw.train_y), self.data["val_size"], self.data["subset"])
        val_idx, train_idx = stratified_take(raw.train_y, n_val, self.seed)
        if n_sub < len(train_idx):
            keep, _ = stratified_take(raw.train_y[train_idx], n_sub, self.seed + 1)
            train_idx = train_idx[keep]
        train_x = torch.from_numpy(np.ascontiguousarray(raw.train_x[train_idx]))
        prep = PREPROCESSING[name]
        # everything the fit depends on: which files (and their versions), which images of
        # them, the method and its constants; any change gives a new key, hence a refit
        key = cache_key(
            version=CACHE_VERSION,
            dataset=dataset,
            files=[_fingerprint(f) for f in raw.files],
            shape=list(raw.train_x.shape),
            train_images=hashlib.sha256(train_idx.astype(np.int64).tobytes()).hexdigest(),
            val=n_val,
            subset=n_sub,
            seed=self.seed,
            preprocess=name,
            constants=prep.constants,
        )
        if stats is not None:
            self.stats, self.stats_source = dict(stats), source or "checkpoint"
        else:
            self.stats, self.stats_source = fitted_stats(
                name, train_x, self.root / "cache", key, prefix=f"{dataset}-"
            )

        def prepped(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            t = prep.apply(torch.from_numpy(np.ascontiguousarray(x)), self.stats)
            # NHWC memory viewed as NCHW: the channels-last layout, with no copy
            return t.permute(0, 3, 1, 2), torch.from_numpy(np.asarray(y, dtype=np.int64))

        self.splits = {
            "train": prepped(raw.train_x[train_idx], raw.train_y[train_idx]),
            "val": prepped(raw.train_x[val_idx], raw.train_y[val_idx]),
            "test": prepped(raw.test_x.copy(), raw.test_y.copy()),  # never the cached arrays
        }
        self.in_channels, self.in_size = c, h
        self.num_classes = len(raw.class_names)
        self.class_names = raw.class_names
        self.files = raw.files

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint (Lightning calls it): the data settings and the fitted
        preprocessing statistics, so a checkpoint alone says how to feed the network."""
        if self.stats is None:
            return {}
        return {"data": dict(self.data), "stats": {k: v.clone() for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved_state = state  # read by ablate visualize; training never restores data

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
        """Each rank takes its share of `batch_size`: a step sees `batch_size` images and an
        epoch has as many steps at any number of ranks (the same experiment)."""
        if self.batch_size % self.world_size:
            raise DataError(
                f"train.batch_size {self.batch_size} is not a multiple of the {self.world_size} "
                "ranks: each rank takes an equal share of every step's images"
            )
        x, y = self.splits["train"]
        return DeviceLoader(
            x,
            y,
            self.batch_size // self.world_size,
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
