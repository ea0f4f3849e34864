"""Datasets, preprocessing and the device-resident loader, chosen by `data.*` settings."""

from datamodules.datamodule import DATASETS, AllConvDataModule, split_sizes, stratified_take
from datamodules.loader import AUGMENTATIONS, DeviceLoader, flip_translate
from datamodules.preprocess import PREPROCESSING
from datamodules.sources import DataError, RawData, make_synthetic

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "PREPROCESSING",
    "AllConvDataModule",
    "DataError",
    "DeviceLoader",
    "RawData",
    "flip_translate",
    "make_synthetic",
    "split_sizes",
    "stratified_take",
]
