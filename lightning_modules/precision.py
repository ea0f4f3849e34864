"""`train.precision` names and how `auto` resolves on a device (imports torch only to ask CUDA)."""

from __future__ import annotations

# train.precision -> Lightning precision ("auto" is resolved per device by resolve_precision)
PRECISIONS: dict[str, str | None] = {
    "auto": None,
    "32": "32-true",
    "bf16": "bf16-mixed",
    "16": "16-mixed",
}


def resolve_precision(setting: str, device: str) -> str:
    """`auto`: bf16 mixed on CUDA GPUs that compute bf16 natively (compute capability 8.0 and
    up), 32-bit everywhere else, CPUs included.

    CPUs with AVX512-BF16 used to get bf16 too, but there these unnormalised nets did not
    learn: the README's one-run example (synthetic, All-CNN-C, width 0.25, 2 epochs) ends at
    80.6% test error with train.precision=bf16 and 0.0% with 32 (README, "Recipe").
    """
    if setting != "auto":
        return PRECISIONS[setting]
    if device != "cuda":
        return "32-true"
    import torch  # here, so that settings can name the precisions without importing torch

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.get_device_capability()[0] >= 8 else "32-true"
    return "32-true"
