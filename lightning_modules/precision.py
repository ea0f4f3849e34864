"""`train.precision` names and how `auto` resolves on a device (imports torch only to ask CUDA)."""

from __future__ import annotations

import functools
from pathlib import Path

# train.precision -> what a run records it ran in ("auto" is resolved per device by
# resolve_precision). `32` is 32-bit throughout: on CUDA, cuDNN's convolutions would
# otherwise run in TF32 (PyTorch's default), 10 bits of mantissa, and be labelled 32-bit;
# `tf32` asks for TF32 by name.
PRECISIONS: dict[str, str | None] = {
    "auto": None,
    "32": "32-true",
    "tf32": "tf32",
    "bf16": "bf16-mixed",
    "16": "16-mixed",
}

# CPU flags of native bf16 arithmetic; without them PyTorch emulates bf16, many times
# slower than 32-bit (docs/recipe.md)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_computes_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has AVX512-BF16 or AMX (Linux; elsewhere we cannot tell: False)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def resolve_precision(setting: str, device: str) -> str:
    """`auto`: bf16 mixed where the device computes bf16 natively (CUDA GPUs of compute
    capability 8.0 and up; CPUs with AVX512-BF16 or AMX), 32-bit elsewhere.

    On such a CPU, paired runs of Model C and All-CNN-C in both precisions (the paper's
    dropout and preprocessing, full Fashion-MNIST, 3 seeds) did not show bf16 costing
    accuracy, and bf16 ran faster (docs/recipe.md, precision; sweeps/recipe_precision.yaml).
    """
    if setting == "tf32" and device != "cuda":
        return "32-true"  # no TF32 outside NVIDIA GPUs: what ran is 32-bit
    if setting != "auto":
        return PRECISIONS[setting]
    if device != "cuda":
        return "bf16-mixed" if cpu_computes_bf16() else "32-true"
    import torch  # here, so that settings can name the precisions without importing torch

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.get_device_capability()[0] >= 8 else "32-true"
    return "32-true"


def lightning_precision(resolved: str) -> str:
    """The Trainer's precision for a resolved name, with the TF32 switches set to match
    (`32-true`: off, so the convolutions are 32-bit; `tf32`: on; mixed precisions: left)."""
    import torch

    if resolved in ("32-true", "tf32"):
        torch.backends.cudnn.allow_tf32 = resolved == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = resolved == "tf32"
        return "32-true"
    return resolved
