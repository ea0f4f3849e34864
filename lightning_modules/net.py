"""The network a `family.ModelSpec` describes: layers for each slot, He init, params and MACs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lightning_modules.family import (
    BASES,
    DROPOUTS,
    HEADS,
    NORMS,
    POOLINGS,
    STRIDED_CONVS,
    ModelSpec,
)


def _max_pool(channels: int) -> nn.Module:
    return nn.MaxPool2d(3, stride=2, padding=1)


def _avg_pool(channels: int) -> nn.Module:
    # count_include_pad=False so the zero padding does not darken the border
    return nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)


POOL_LAYERS: dict[str, Callable[[int], nn.Module] | None] = {
    "max": _max_pool,
    "avg": _avg_pool,
    "none": None,
}

NORM_LAYERS: dict[str, Callable[[int], nn.Module] | None] = {"none": None, "batch": nn.BatchNorm2d}


def _conv_block(c_in: int, c_out: int, k: int, stride: int, padding: int, norm: str) -> nn.Module:
    norm_layer = NORM_LAYERS[norm]
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=norm_layer is None)
    ]
    if norm_layer is not None:
        layers.append(norm_layer(c_out))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _scores(layer: nn.Module, relu: bool) -> list[nn.Module]:
    # The paper's Table 1 puts a ReLU on the class scores (model.score_relu=true); by default
    # there is none, since with one training often never leaves ln(10) (several
    # re-implementations report it) and a class whose score is clipped at 0 gets no gradient.
    return [layer, nn.ReLU(inplace=True)] if relu else [layer]


def _gap_head(
    c_in: int, width: int, classes: int, size: int, norm: str, score_relu: bool
) -> nn.Module:
    return nn.Sequential(
        _conv_block(c_in, width, 3, 1, 0, norm),
        _conv_block(width, width, 1, 1, 0, norm),
        *_scores(nn.Conv2d(width, classes, 1), score_relu),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _fc_head(
    c_in: int, width: int, classes: int, size: int, norm: str, score_relu: bool
) -> nn.Module:
    side = size - 2
    return nn.Sequential(
        _conv_block(c_in, width, 3, 1, 0, norm),
        nn.Flatten(),
        nn.Linear(width * side * side, width),
        nn.ReLU(inplace=True),
        *_scores(nn.Linear(width, classes), score_relu),
    )


HEAD_LAYERS: dict[str, Callable[[int, int, int, int, str, bool], nn.Module]] = {
    "gap": _gap_head,
    "fc": _fc_head,
}


# every name the spec accepts has a builder here (checked at import: a new slot value
# added to family.py without its layers fails at once, not at the first run)
for _table, _layers in ((POOLINGS, POOL_LAYERS), (NORMS, NORM_LAYERS), (HEADS, HEAD_LAYERS)):
    assert set(_table) == set(_layers), (set(_table), set(_layers))
assert set(STRIDED_CONVS) == {"none", "fold", "extra"}


# --- the builder ---------------------------------------------------------------------------


class AllConvNet(nn.Module):
    """stage1 -> stage2 -> head; each stage ends at a downsampling point."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        p_in, p_down = DROPOUTS[spec.dropout]
        c1, c2, c_top = spec.channels()
        layers: dict[str, nn.Module] = {"input_dropout": nn.Dropout(p_in)}
        c_in = spec.in_channels
        for i, c_out in enumerate((c1, c2), start=1):
            layers[f"stage{i}"] = self._stage(c_in, c_out, p_down)
            c_in = c_out
        layers["head"] = HEAD_LAYERS[spec.head](
            c_in, c_top, spec.num_classes, spec.feature_sizes()[2], spec.norm, spec.score_relu
        )
        self.layers = nn.Sequential()
        for key, module in layers.items():
            self.layers.add_module(key, module)
        init_weights(self)

    def _stage(self, c_in: int, c_out: int, p_drop: float) -> nn.Sequential:
        spec = self.spec
        kernels = BASES[spec.base]
        stage = nn.Sequential()
        for j, k in enumerate(kernels):
            last = j == len(kernels) - 1
            stride = 2 if (last and spec.strided_conv == "fold") else 1
            stage.append(_conv_block(c_in, c_out, k, stride, k // 2, spec.norm))
            c_in = c_out
        if spec.strided_conv == "extra":
            stride = 1 if spec.pooling != "none" else 2
            stage.append(_conv_block(c_out, c_out, 3, stride, 1, spec.norm))
        pool = POOL_LAYERS[spec.pooling]
        if pool is not None:
            stage.append(pool(c_out))
        stage.append(nn.Dropout(p_drop))
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal, fan-in, zero biases, corrected for what surrounds each layer.

    PyTorch's default (uniform, a = sqrt(5)) shrinks the activations layer by layer, and
    these nets, which have no normalisation, then sit at chance for many epochs. He init keeps
    the forward variance near 1 through all nine layers, with two corrections:

    - a layer right after a dropout of rate p is scaled by sqrt(1 - p), since dropout's 1/(1-p)
      rescaling multiplies the second moment it passes on in training by 1/(1-p) (Hendrycks
      and Gimpel, 2016). Without it, the paper's dropout makes Model C's training-mode logits
      four times larger than its eval-mode ones and the start loss about 6.6 instead of ln 10;
      at learning rate 0.05 and width 0.25 that kills every ReLU in the first epoch;
    - the class-score layer, when no ReLU follows it (model.score_relu=false), gets gain 1
      instead of ReLU's sqrt(2).

    Measured on Fashion-MNIST (Model C, width 0.25, 10000 images, 2 epochs, lr 0.01): test
    error 78% with plain He init and epoch milestones, 40.6% with these corrections and the
    step milestones of module.milestones (docs/models.md).
    """
    dropped = 0.0  # the dropout rate applied since the last weight layer
    last = None
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            dropped = 1 - (1 - dropped) * (1 - m.p)
        elif isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if dropped:
                with torch.no_grad():
                    m.weight.mul_(math.sqrt(1 - dropped))
            dropped, last = 0.0, m
    spec = getattr(model, "spec", None)
    if last is not None and not (spec and spec.score_relu):
        # modules() walks in forward order: the last weight layer scores the classes
        with torch.no_grad():
            last.weight.mul_(math.sqrt(0.5))


def build(spec: ModelSpec) -> AllConvNet:
    return AllConvNet(spec)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: AllConvNet) -> int:
    """Multiply-accumulates for one image: convolutions and linear layers."""
    spec = model.spec
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = math.prod(module.kernel_size) * module.in_channels // module.groups
            total += output[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.no_grad():
            model.eval()
            device = next(model.parameters()).device
            model(torch.zeros(1, spec.in_channels, spec.in_size, spec.in_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return total


def describe(spec: ModelSpec) -> dict[str, object]:
    """One row of `ablate models`: name, factors, params, MACs, feature-map sizes."""
    net = build(spec)
    sizes = spec.feature_sizes()
    return {
        "model.name": spec.name,
        **{k: v for k, v in spec.settings().items()},
        "params": count_params(net),
        "macs": count_macs(net),
        "feature_maps": " -> ".join(f"{s}x{s}" for s in sizes),
    }
