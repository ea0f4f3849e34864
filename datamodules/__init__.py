"""Datasets, preprocessing and the device-resident loader, chosen by `data.*` settings.

Names are resolved on first use (PEP 562), so `from datamodules import DataError` or the
choice tables do not import torch or Lightning; the CLI's `--help`, `status` and `export`
stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from datamodules.choices import AUGMENT_CHOICES, AUTO_PREPROCESS, PREPROCESS_CHOICES
from datamodules.sources import SOURCES as DATASETS
from datamodules.sources import DataError, RawData, make_synthetic
from datamodules.splits import split_sizes, stratified_take

_LAZY = {
    "AllConvDataModule": "datamodules.datamodule",
    "AUGMENTATIONS": "datamodules.loader",
    "DeviceLoader": "datamodules.loader",
    "flip_translate": "datamodules.loader",
    "PREPROCESSING": "datamodules.preprocess",
}

__all__ = [
    "AUGMENT_CHOICES",
    "DATASETS",
    "AUTO_PREPROCESS",
    "PREPROCESS_CHOICES",
    "DataError",
    "RawData",
    "make_synthetic",
    "split_sizes",
    "stratified_take",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
