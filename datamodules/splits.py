"""How a data set's training images are split into training, validation and a subset
(numpy only: the sweep launcher checks every cell's split before any worker starts)."""

from __future__ import annotations

import numpy as np

from datamodules.sources import DataError

VAL_AUTO_FRACTION, VAL_AUTO_MAX = 0.1, 5000  # data.val_size=auto: 10%, at most 5000


def stratified_take(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick n indices with the class proportions of `labels`; returns (taken, rest), sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    quota = np.floor(exact).astype(int)
    # largest remainders get the leftover images, ties broken by class order
    leftover = n - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed % 2**64)  # any int seed, negative ones too
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
