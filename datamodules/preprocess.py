"""Preprocessing fitted on the training split only: GCN + ZCA (the paper) or standardise."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

GCN_SCALE = 55.0  # the paper's (pylearn2's) global contrast normalisation scale
ZCA_BIAS = 0.1  # pylearn2's filter_bias: keeps near-zero eigenvalues from exploding noise


def gcn(x: torch.Tensor) -> torch.Tensor:
    """Per image: subtract its mean, divide by its norm, times 55. x: (N, D) float."""
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return GCN_SCALE * x / norm


def fit_gcn_zca(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x: (N, H, W, C) uint8 training images -> the mean and the ZCA matrix."""
    flat = gcn(x.reshape(len(x), -1).double())
    mean = flat.mean(dim=0)
    centred = flat - mean
    cov = centred.T @ centred / len(flat)
    eigval, eigvec = torch.linalg.eigh(cov)
    whiten = eigvec @ torch.diag(1.0 / torch.sqrt(eigval.clamp_min(0) + ZCA_BIAS)) @ eigvec.T
    return {"mean": mean.float(), "whiten": whiten.float()}


def apply_gcn_zca(x: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    n, h, w, c = x.shape
    out = torch.empty(n, h * w * c)
    for i in range(0, n, 8192):  # chunks keep the float64 peak small on 50k CIFAR images
        chunk = gcn(x[i : i + 8192].reshape(-1, h * w * c).float())
        out[i : i + 8192] = (chunk - stats["mean"]) @ stats["whiten"]
    return out.reshape(n, h, w, c)


def fit_standardize(x: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = x.reshape(-1, x.shape[-1]).double()
    return {"mean": flat.mean(dim=0).float(), "std": flat.std(dim=0).clamp_min(1e-6).float()}


def apply_standardize(x: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    return (x.float() - stats["mean"]) / stats["std"]


PREPROCESSING: dict[str, tuple[Callable, Callable]] = {
    "gcn-zca": (fit_gcn_zca, apply_gcn_zca),
    "standardize": (fit_standardize, apply_standardize),
}


def cache_key(**parts: object) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fitted_stats(
    name: str,
    train_x: torch.Tensor,
    cache_dir: Path | None,
    key: str,
) -> tuple[dict[str, torch.Tensor], str]:
    """Fit `name` on the training images, or load it from the cache; returns (stats, source)."""
    fit, _ = PREPROCESSING[name]
    path = cache_dir / f"{name}-{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            stats = torch.load(path, weights_only=True)
            if (
                isinstance(stats, dict)
                and all(isinstance(v, torch.Tensor) for v in stats.values())
                and stats
            ):
                return stats, f"cache {path}"
        except Exception:
            pass  # corrupt or from another version: refit below, never trust it
    stats = fit(train_x)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            torch.save(stats, tmp)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
        except OSError:
            pass  # a read-only data.dir only costs a refit next time
    return stats, f"fitted {path}" if path else "fitted"
