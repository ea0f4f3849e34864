"""What `ablate visualize` offers (methods, layer names) and its error, shared by the command
(ablations/visualize.py, no torch) and the maps (ablations/saliency.py, torch and Captum)."""

from __future__ import annotations

from typing import Any

from ablations import settings as S

METHODS = {  # column title -> Captum class name
    "gradient": "Saliency",
    "deconvnet": "Deconvolution",
    "guided backprop": "GuidedBackprop",
}
LAYER_ALIASES = {"stage1": "layers.stage1", "stage2": "layers.stage2", "head": "layers.head"}


class VisualizeError(ValueError):
    """Bad input to `ablate visualize`; the message says what to give instead."""


def plain_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's settings.yaml back into settings: derived keys dropped, the variant kept."""
    derived = {"model.name", "data.files", "model.pooling", "model.strided_conv"}
    out = {k: v for k, v in saved.items() if k in S.SCHEMA and k not in derived}
    if saved.get("model.variant") is None:  # not a paper variant: its slots say what it is
        out.pop("model.variant", None)
        out["model.pooling"] = saved["model.pooling"]
        out["model.strided_conv"] = saved["model.strided_conv"]
    return out
