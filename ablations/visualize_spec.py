"""What `ablate visualize` offers (methods, layer names) and its error, shared by the command
(ablations/visualize.py, no torch) and the maps (ablations/saliency.py, torch and Captum)."""

from __future__ import annotations

METHODS = {  # column title -> Captum class name
    "gradient": "Saliency",
    "deconvnet": "Deconvolution",
    "guided backprop": "GuidedBackprop",
}
LAYER_ALIASES = {"stage1": "layers.stage1", "stage2": "layers.stage2", "head": "layers.head"}


class VisualizeError(ValueError):
    """Bad input to `ablate visualize`; the message says what to give instead."""
