"""The All Convolutional Net family as data: slot tables (name -> meaning) and a frozen spec.

Springenberg et al. 2015 (arXiv 1412.6806), Tables 1 and 2. Pure Python, so that settings,
sweep files and exports can check a model without importing torch; `lightning_modules.net`
builds the network a spec describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


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


POOLINGS: dict[str, str] = {
    "max": "3x3 max pooling, stride 2",
    "avg": "3x3 average pooling, stride 2 (padding not counted)",
    "none": "no pooling",
}

# How each stage downsamples when it has no pooling or in addition to it (docs/models.md).
STRIDED_CONVS: dict[str, str] = {
    "none": "no strided convolution",
    "fold": "the stage's last conv gets stride 2 (Strided-CNN)",
    "extra": "one more 3x3 conv closes the stage: stride 2 without pooling, 1 with it",
}

NORMS: dict[str, str] = {"none": "no normalisation", "batch": "batch norm after each conv"}

# (input dropout, dropout after each downsampling point). `downsample` drops the paper's input
# dropout only: on one-channel images the first conv sees 9 pixels, and dropping a fifth of
# them shifts its ReLU outputs between training and evaluation (docs/recipe.md).
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

HEADS: dict[str, str] = {
    "gap": "3x3 conv, 1x1 conv, 1x1 class scores, global average pooling (the paper's)",
    "fc": "3x3 conv, a fully connected layer, then fully connected class scores",
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
