"""The run settings: one flat dict of dotted keys, shared by the CLI, sweeps, tables and W&B."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import yaml

from datamodules import AUGMENTATIONS, DATASETS, PREPROCESSING
from lightning_modules import family
from lightning_modules.module import PRECISIONS


class SettingsError(ValueError):
    """A bad setting: the message names the key and what is valid."""


@dataclass(frozen=True)
class Setting:
    default: Any
    kind: str  # "str", "int", "float", "bool", "int|auto", "int|none", "str|none"
    choices: tuple[str, ...] | None = None
    help: str = ""


def _names(table: dict) -> tuple[str, ...]:
    return tuple(table)


SCHEMA: dict[str, Setting] = {
    "model.base": Setting("C", "str", _names(family.BASES), "paper Table 1 stage layout"),
    "model.variant": Setting(
        None,
        "str|none",
        _names(family.VARIANTS),
        "shorthand for a paper (pooling, strided_conv) pair",
    ),
    "model.pooling": Setting(
        None,
        "str|none",
        _names(family.POOLINGS),
        "3x3/stride-2 pooling at the downsampling points (default max)",
    ),
    "model.strided_conv": Setting(
        None,
        "str|none",
        _names(family.STRIDED_CONVS),
        "none, fold (Strided-CNN) or extra (All-CNN/ConvPool)",
    ),
    "model.head": Setting("gap", "str", _names(family.HEADS), "classifier head"),
    "model.width": Setting(1.0, "float", None, "channel multiplier"),
    "model.norm": Setting("none", "str", _names(family.NORMS), "normalisation after convs"),
    "model.dropout": Setting(
        "paper",
        "str",
        _names(family.DROPOUTS),
        "paper: 20% on the input, 50% after each downsampling point; downsample: the 50% only",
    ),
    "model.score_relu": Setting(
        False, "bool", None, "ReLU on the class-score 1x1 conv, as in the paper's Table 1"
    ),
    "data.dataset": Setting("cifar10", "str", _names(DATASETS), "dataset"),
    "data.dir": Setting("~/.cache/allconv/data", "str", None, "where datasets live"),
    # standardize by default: cheap and robust on any data; the paper sweeps set gcn-zca
    "data.preprocess": Setting(
        "standardize", "str", _names(PREPROCESSING), "gcn-zca (the paper) or standardize"
    ),
    "data.augment": Setting("none", "str", _names(AUGMENTATIONS), "on-device augmentation"),
    "data.val_size": Setting(
        "auto", "int|auto", None, "held-out training images (auto: 10%, at most 5000)"
    ),
    "data.subset": Setting(None, "int|none", None, "cap on the training images"),
    "train.lr": Setting(0.01, "float", None, "SGD learning rate (paper grid: 0.25 0.1 0.05 0.01)"),
    "train.warmup_epochs": Setting(
        0.0, "float", None, "linear lr warm-up from 0, in epochs (not in the paper: 0)"
    ),
    "train.lr_gamma": Setting(0.1, "float", None, "lr factor at 200, 250, 300 of 350 epochs"),
    "train.momentum": Setting(0.9, "float", None, "SGD momentum"),
    "train.weight_decay": Setting(0.001, "float", None, "L2 weight decay"),
    "train.epochs": Setting(350, "int", None, "epochs"),
    "train.batch_size": Setting(128, "int", None, "training batch size"),
    "train.eval_batch_size": Setting(1024, "int", None, "evaluation batch size (no gradients)"),
    "train.precision": Setting(
        "auto",
        "str",
        _names(PRECISIONS),
        "auto: bf16 mixed on CUDA GPUs with compute capability >= 8, else 32-bit",
    ),
    "train.compile": Setting(False, "bool", None, "torch.compile the network"),
    "train.accelerator": Setting("auto", "str", ("auto", "cpu", "gpu"), "Lightning accelerator"),
    "seed": Setting(0, "int", None, "seeds data split, init, order and augmentation"),
}

# Keys that only say where or how fast, not what is computed: left out of the cell identity.
OPERATIONAL = ("data.dir", "train.accelerator", "train.compile")


def defaults() -> dict[str, Any]:
    return {k: s.default for k, s in SCHEMA.items()}


def suggest(key: str, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_key(key: str) -> Setting:
    if key not in SCHEMA:
        raise SettingsError(
            f"unknown setting {key!r}{suggest(key, list(SCHEMA))} (valid keys: {', '.join(SCHEMA)})"
        )
    return SCHEMA[key]


def coerce(key: str, value: Any) -> Any:
    """Check one value against its key's type and choices; strings from the CLI are parsed."""
    setting = check_key(key)
    kinds = setting.kind.split("|")
    if isinstance(value, str) and "str" not in kinds:
        value = value.strip()
        if value.lower() in ("none", "null", "") and "none" in kinds:
            return None
        if value == "auto" and "auto" in kinds:
            return "auto"
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if isinstance(value, str) and kinds[0] == "float":
        # YAML 1.1 reads 1e-3 (no dot) as a string; Python reads every spelling of a number
        try:
            value = float(value)
        except ValueError:
            pass
    if value is None and "none" in kinds:
        return None
    if value == "auto" and "auto" in kinds:
        return value
    want = kinds[0]
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }[want]
    if not ok:
        extra = {"auto": " or 'auto'", "none": " or 'none'"}
        allowed = want + "".join(extra.get(k, "") for k in kinds[1:])
        raise SettingsError(f"{key}={value!r} has the wrong type: expected {allowed}")
    if want == "float":
        value = float(value)
        if not math.isfinite(value):
            raise SettingsError(f"{key}={value!r} must be a finite number")
    if setting.choices is not None and value not in setting.choices:
        raise SettingsError(
            f"{key}={value!r} is not one of the valid values: {', '.join(setting.choices)}"
        )
    return value


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`key=value` strings from the command line, checked one by one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{item!r} is not a key=value setting (e.g. model.head=fc)")
        out[key.strip()] = coerce(key.strip(), raw)
    return out


def resolve(overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults + overrides, every value checked, the model spec validated."""
    settings = defaults()
    for key, value in overrides.items():
        settings[key] = coerce(key, value)
    for key in ("train.epochs", "train.batch_size", "train.eval_batch_size"):
        if settings[key] < 1:
            raise SettingsError(f"{key}={settings[key]} must be at least 1")
    for key in ("train.lr", "model.width"):
        if settings[key] <= 0:
            raise SettingsError(f"{key}={settings[key]} must be positive")
    if settings["train.warmup_epochs"] < 0:
        raise SettingsError(f"train.warmup_epochs={settings['train.warmup_epochs']} must be >= 0")
    model_spec(settings)  # validates the combination at a nominal input shape
    return settings


def model_spec(
    settings: dict[str, Any], in_channels: int = 3, in_size: int = 32, num_classes: int = 10
) -> family.ModelSpec:
    return family.spec_from_settings(settings, in_channels, in_size, num_classes)


def flat_with_name(settings: dict[str, Any], spec: family.ModelSpec) -> dict[str, Any]:
    """Settings with the variant expanded into the slots and `model.name` added."""
    out = dict(settings)
    out.update(spec.settings())
    out["model.variant"] = spec.variant
    out["model.name"] = spec.name
    return out
