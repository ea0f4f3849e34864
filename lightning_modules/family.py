"""The All Convolutional Net family as data: slot tables, a frozen spec, one builder.

Springenberg et al. 2015 (arXiv 1412.6806), Tables 1 and 2. This module imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import nn


class SpecError(ValueError):
    """A model setting that cannot be built; the message says why and what is valid."""


def _choose(table: dict, key: str, value: object) -> object:
    if value not in table:
        valid = ", ".join(str(k) for k in table)
        raise SpecError(f"{key}={value!r} is not one of the valid values: {valid}")
    return table[value]


# --- the slots: each a table from name to what it means ------------------------------------

# Table 1: the convolutions of each stage, as kernel sizes; the stage width is 96 then 192.
BASES: dict[str, tuple[int, ...]] = {"A": (5,), "B": (5, 1), "C": (3, 3)}
STAGE_WIDTHS = (96, 192)
TOP_WIDTH = 192


def _max_pool(channels: int) -> nn.Module:
    return nn.MaxPool2d(3, stride=2, padding=1)


def _avg_pool(channels: int) -> nn.Module:
    # count_include_pad=False so the zero padding does not darken the border
    return nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)


POOLINGS: dict[str, Callable[[int], nn.Module] | None] = {
    "max": _max_pool,
    "avg": _avg_pool,
    "none": None,
}

# How each stage downsamples when it has no pooling or in addition to it (DESIGN.md).
STRIDED_CONVS: dict[str, str] = {
    "none": "no strided convolution",
    "fold": "the stage's last conv gets stride 2 (Strided-CNN)",
    "extra": "one more 3x3 conv closes the stage: stride 2 without pooling, 1 with it",
}

NORMS: dict[str, Callable[[int], nn.Module] | None] = {"none": None, "batch": nn.BatchNorm2d}

# (input dropout, dropout after each downsampling point). `downsample` drops the paper's input
# dropout only: on one-channel images the first conv sees 9 pixels, and dropping a fifth of
# them shifts its ReLU outputs between training and evaluation (README, "Recipe").
DROPOUTS: dict[str, tuple[float, float]] = {
    "paper": (0.2, 0.5),
    "downsample": (0.0, 0.5),
    "none": (0.0, 0.0),
}

# Paper variants as (pooling, strided_conv) pairs; `model.variant` is shorthand for them.
VARIANTS: dict[str, tuple[str, str]] = {
    "base": ("max", "none"),
    "strided": ("none", "fold"),
    "convpool": ("max", "extra"),
    "all-cnn": ("none", "extra"),
}
PAPER_NAMES: dict[str, str] = {
    "base": "Model {base}",
    "strided": "Strided-CNN-{base}",
    "convpool": "ConvPool-CNN-{base}",
    "all-cnn": "All-CNN-{base}",
}


def _conv_block(c_in: int, c_out: int, k: int, stride: int, padding: int, norm: str) -> nn.Module:
    norm_layer = NORMS[norm]
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


HEADS: dict[str, Callable[[int, int, int, int, str, bool], nn.Module]] = {
    "gap": _gap_head,
    "fc": _fc_head,
}


# --- the spec ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides the network; `asdict` is its serialisation."""

    base: str = "C"
    pooling: str = "max"
    strided_conv: str = "none"
    head: str = "gap"
    width: float = 1.0
    norm: str = "none"
    dropout: str = "paper"
    score_relu: bool = False
    in_channels: int = field(default=3, metadata={"input": True})
    in_size: int = field(default=32, metadata={"input": True})
    num_classes: int = field(default=10, metadata={"input": True})

    def __post_init__(self) -> None:
        _choose(BASES, "model.base", self.base)
        _choose(POOLINGS, "model.pooling", self.pooling)
        _choose(STRIDED_CONVS, "model.strided_conv", self.strided_conv)
        _choose(HEADS, "model.head", self.head)
        _choose(NORMS, "model.norm", self.norm)
        _choose(DROPOUTS, "model.dropout", self.dropout)
        if not isinstance(self.score_relu, bool):
            raise SpecError(f"model.score_relu={self.score_relu!r} must be true or false")
        if not (isinstance(self.width, int | float) and self.width > 0):
            raise SpecError(f"model.width={self.width!r} must be a positive number")
        if self.pooling != "none" and self.strided_conv == "fold":
            raise SpecError(
                f"model.pooling={self.pooling} with model.strided_conv=fold would halve the "
                "resolution twice per stage (stride-2 conv, then pooling); use "
                "model.pooling=none for a Strided-CNN, or model.strided_conv=extra for ConvPool"
            )
        sizes = self.feature_sizes()
        if sizes[-1] < 1:
            trail = " -> ".join(str(s) for s in sizes[:-1])
            raise SpecError(
                f"input {self.in_size}x{self.in_size} is too small: feature maps go {trail}, "
                f"and the top 3x3 convolution (no padding) needs at least 3x3, got "
                f"{sizes[-2]}x{sizes[-2]}"
            )

    @property
    def variant(self) -> str | None:
        for name, pair in VARIANTS.items():
            if pair == (self.pooling, self.strided_conv):
                return name
        return None

    @property
    def name(self) -> str:
        """The paper's name for a paper architecture, else `base/pooling/strided_conv/head`."""
        if self.variant is not None and self.head == "gap":
            return PAPER_NAMES[self.variant].format(base=self.base)
        return f"{self.base}/{self.pooling}/{self.strided_conv}/{self.head}"

    def channels(self) -> tuple[int, int, int]:
        return tuple(max(1, round(c * self.width)) for c in (*STAGE_WIDTHS, TOP_WIDTH))

    def downsamples(self) -> bool:
        return self.pooling != "none" or self.strided_conv != "none"

    def feature_sizes(self) -> list[int]:
        """Side length after the input, each stage and the top 3x3 conv."""
        sizes, size = [self.in_size], self.in_size
        for _ in STAGE_WIDTHS:
            if self.downsamples():
                size = (size - 1) // 2 + 1  # k3/s2/p1 pooling or stride-2 conv
            sizes.append(size)
        sizes.append(size - 2)
        return sizes

    def settings(self) -> dict[str, object]:
        """The `model.*` settings (no input shape), as the sweep files and tables name them."""
        return {f"model.{f.name}": getattr(self, f.name) for f in fields(self) if not f.metadata}


def spec_from_settings(
    settings: dict[str, object], in_channels: int = 3, in_size: int = 32, num_classes: int = 10
) -> ModelSpec:
    """Build a spec from `model.*` settings, expanding `model.variant`."""
    model = {k.removeprefix("model."): v for k, v in settings.items() if k.startswith("model.")}
    variant = model.pop("variant", None)
    model.pop("name", None)
    if variant is not None:
        pooling, strided = _choose(VARIANTS, "model.variant", variant)
        clash = [k for k in ("pooling", "strided_conv") if model.get(k) is not None]
        if clash:
            raise SpecError(
                f"model.variant={variant} sets model.pooling={pooling} and "
                f"model.strided_conv={strided}; do not also set "
                + " or ".join(f"model.{k}" for k in clash)
            )
        model.update(pooling=pooling, strided_conv=strided)
    model = {k: v for k, v in model.items() if v is not None}
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise SpecError(f"unknown model setting(s): {', '.join('model.' + k for k in unknown)}")
    return ModelSpec(**model, in_channels=in_channels, in_size=in_size, num_classes=num_classes)


def paper_presets(
    in_channels: int = 3, in_size: int = 32, num_classes: int = 10
) -> dict[str, ModelSpec]:
    """The twelve models of Table 3, by their paper names."""
    out = {}
    for base in BASES:
        for pooling, strided in VARIANTS.values():
            spec = ModelSpec(
                base,
                pooling,
                strided,
                in_channels=in_channels,
                in_size=in_size,
                num_classes=num_classes,
            )
            out[spec.name] = spec
    return out


def all_specs(
    in_channels: int = 3, in_size: int = 32, num_classes: int = 10
) -> tuple[list[ModelSpec], list[tuple[dict[str, str], str]]]:
    """Every base x pooling x strided_conv x head combination: (valid specs, invalid+reason)."""
    valid, invalid = [], []
    for base in BASES:
        for pooling in POOLINGS:
            for strided in STRIDED_CONVS:
                for head in HEADS:
                    combo = dict(base=base, pooling=pooling, strided_conv=strided, head=head)
                    try:
                        valid.append(
                            ModelSpec(
                                **combo,
                                in_channels=in_channels,
                                in_size=in_size,
                                num_classes=num_classes,
                            )
                        )
                    except SpecError as err:
                        invalid.append((combo, str(err)))
    return valid, invalid


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
        layers["head"] = HEADS[spec.head](
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
        pool = POOLINGS[spec.pooling]
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
    step milestones of module.milestones (README, "The model family").
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
