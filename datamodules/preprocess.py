"""Preprocessing fitted on the training split only: GCN + ZCA (the paper) or standardise."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from datamodules.choices import PREPROCESS_CHOICES

GCN_SCALE = 55.0  # the paper's (pylearn2's) global contrast normalisation scale
ZCA_BIAS = 0.1  # pylearn2's filter_bias: keeps near-zero eigenvalues from exploding noise
CHUNK = 8192  # images per step: keeps the float64 peak small on 50k CIFAR images
CACHE_VERSION = 1  # bump when a fit changes meaning, so older cache files are not used


def gcn(x: torch.Tensor) -> torch.Tensor:
    """Per image: subtract its mean, divide by its norm, times 55. x: (N, D) float."""
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return GCN_SCALE * x / norm


def fit_gcn_zca(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x: (N, H, W, C) uint8 training images -> the mean and the ZCA matrix."""
    n, d = len(x), x[0].numel()
    total = torch.zeros(d, dtype=torch.float64)
    gram = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, CHUNK):  # sums in float64, so no (N, D) float64 copy is ever made
        chunk = gcn(x[i : i + CHUNK].reshape(-1, d).double())
        total += chunk.sum(dim=0)
        gram += chunk.T @ chunk
    mean = total / n
    cov = gram / n - torch.outer(mean, mean)
    eigval, eigvec = torch.linalg.eigh(cov)
    scale = 1.0 / torch.sqrt(eigval.clamp_min(0) + ZCA_BIAS)
    whiten = (eigvec * scale) @ eigvec.T
    return {"mean": mean.float(), "whiten": whiten.float()}


def apply_gcn_zca(x: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    n, h, w, c = x.shape
    out = torch.empty(n, h * w * c)
    for i in range(0, n, CHUNK):
        chunk = gcn(x[i : i + CHUNK].reshape(-1, h * w * c).float())
        out[i : i + CHUNK] = (chunk - stats["mean"]) @ stats["whiten"]
    return out.reshape(n, h, w, c)


def fit_standardize(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel mean and std over every pixel of the training images."""
    c = x.shape[-1]
    flat = x.reshape(-1, c)
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    step = CHUNK * 1024
    for i in range(0, len(flat), step):
        chunk = flat[i : i + step].double()
        total += chunk.sum(dim=0)
        squares += chunk.square().sum(dim=0)
    m = len(flat)
    mean = total / m
    var = (squares - m * mean.square()).clamp_min(0) / max(m - 1, 1)
    return {"mean": mean.float(), "std": var.sqrt().clamp_min(1e-6).float()}


def apply_standardize(x: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    return (x.float() - stats["mean"]) / stats["std"]


class Preprocessing(NamedTuple):
    fit: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    apply: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
    # the stats' shapes for images of shape (H, W, C): how a cache file is checked
    shapes: Callable[[tuple[int, ...]], dict[str, tuple[int, ...]]]
    constants: dict[str, float]  # part of the cache key: change one and the cache refits


def _zca_shapes(hwc: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    d = hwc[0] * hwc[1] * hwc[2]
    return {"mean": (d,), "whiten": (d, d)}


PREPROCESSING: dict[str, Preprocessing] = {
    "gcn-zca": Preprocessing(
        fit_gcn_zca,
        apply_gcn_zca,
        _zca_shapes,
        {"gcn_scale": GCN_SCALE, "zca_bias": ZCA_BIAS},
    ),
    "standardize": Preprocessing(
        fit_standardize,
        apply_standardize,
        lambda hwc: {"mean": (hwc[2],), "std": (hwc[2],)},
        {},
    ),
}
assert set(PREPROCESSING) == set(PREPROCESS_CHOICES), set(PREPROCESSING) ^ set(PREPROCESS_CHOICES)


def cache_key(**parts: object) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _valid(stats: object, shapes: dict[str, tuple[int, ...]]) -> bool:
    return (
        isinstance(stats, dict)
        and set(stats) == set(shapes)
        and all(
            isinstance(v, torch.Tensor)
            and tuple(v.shape) == shapes[k]
            and v.dtype == torch.float32
            and bool(torch.isfinite(v).all())
            for k, v in stats.items()
        )
    )


def fitted_stats(
    name: str,
    train_x: torch.Tensor,
    cache_dir: Path | None,
    key: str,
    prefix: str = "",
) -> tuple[dict[str, torch.Tensor], str]:
    """Fit `name` on the training images, or load it from the cache; returns (stats, source).

    The key must name everything the fit depends on (dataset files, which images, settings);
    a cache file that does not load, or holds the wrong names, shapes or non-finite values,
    is refitted and replaced, never trusted.
    """
    prep = PREPROCESSING[name]
    shapes = prep.shapes(tuple(train_x.shape[1:]))
    path = cache_dir / f"{prefix}{name}-{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            stats = torch.load(path, weights_only=True)
        except Exception:  # truncated, garbage, another format: refit below
            stats = None
        if _valid(stats, shapes):
            return stats, f"cache {path}"
    stats = prep.fit(train_x)
    if path is not None:
        _save_atomic(stats, path)
    return stats, f"fitted {path}" if path else "fitted"


def _save_atomic(stats: dict[str, torch.Tensor], path: Path) -> None:
    """Write whole or not at all: a reader sees the old file or the complete new one."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(stats, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError):  # torch.save reports a full disk as RuntimeError
        # a read-only or full data.dir only costs a refit next time
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
