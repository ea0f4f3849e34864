"""The run settings: one flat dict of dotted keys, shared by the CLI, sweeps, tables and W&B."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, NewType

import yaml

from datamodules import AUGMENT_CHOICES, AUTO_PREPROCESS, DATASETS, PREPROCESS_CHOICES
from lightning_modules import family
from lightning_modules.precision import PRECISIONS


class SettingsError(ValueError):
    """A bad setting: the message names the key and what is valid."""


@dataclass(frozen=True)
class Setting:
    """One setting: everything parsing, checking, `--help`, the CSV columns and W&B need."""

    type: type  # str, int, float or bool
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    also: tuple[Any, ...] = ()  # accepted besides the type: "auto" and/or None
    low: float | None = None  # inclusive bounds, checked after parsing
    high: float | None = None
    above: float | None = None  # exclusive lower bound (a rate, a width)

    @property
    def kind(self) -> str:
        """How `--help` and error messages name what is accepted: `int or 'auto'`."""
        extra = ["'none'" if a is None else repr(a) for a in self.also]
        return " or ".join([self.type.__name__, *extra])

    def bounds(self) -> str:
        parts = []
        if self.above is not None:
            parts.append(f"> {_num(self.above)}")
        if self.low is not None:
            parts.append(f">= {_num(self.low)}")
        if self.high is not None:
            parts.append(f"<= {_num(self.high)}")
        return ", ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _names(table: dict) -> tuple[str, ...]:
    return tuple(table)


# the model's defaults are ModelSpec's: written once, in lightning_modules/family.py
_SPEC = {f.name: f.default for f in fields(family.ModelSpec)}
MAX_WIDTH = 8.0  # 768/1536 channels: beyond it one image's activations no longer fit a GPU
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range

SCHEMA: dict[str, Setting] = {
    "model.base": Setting(str, _SPEC["base"], "paper Table 1 stage layout", _names(family.BASES)),
    "model.variant": Setting(
        str,
        None,
        "shorthand for a paper (pooling, strided_conv) pair",
        _names(family.VARIANTS),
        also=(None,),
    ),
    "model.pooling": Setting(
        str,
        None,
        f"3x3/stride-2 pooling at the downsampling points (default {_SPEC['pooling']})",
        _names(family.POOLINGS),
        also=(None,),
    ),
    "model.strided_conv": Setting(
        str,
        None,
        f"none, fold (Strided-CNN) or extra (All-CNN/ConvPool) (default {_SPEC['strided_conv']})",
        _names(family.STRIDED_CONVS),
        also=(None,),
    ),
    "model.head": Setting(str, _SPEC["head"], "classifier head", _names(family.HEADS)),
    "model.width": Setting(float, _SPEC["width"], "channel multiplier", above=0, high=MAX_WIDTH),
    "model.norm": Setting(str, _SPEC["norm"], "normalisation after convs", _names(family.NORMS)),
    "model.dropout": Setting(
        str,
        _SPEC["dropout"],
        "paper: 20% on the input, 50% after each downsampling point; downsample: the 50% only",
        _names(family.DROPOUTS),
    ),
    "model.score_relu": Setting(
        bool, _SPEC["score_relu"], "ReLU on the class-score 1x1 conv, as in the paper's Table 1"
    ),
    "data.dataset": Setting(str, "cifar10", "dataset", _names(DATASETS)),
    "data.dir": Setting(str, "~/.cache/allconv/data", "where datasets live"),
    # auto is resolved per data set (datamodules/choices.py says why): every run records
    # the preprocessing it used, never "auto"
    "data.preprocess": Setting(
        str,
        "auto",
        "gcn-zca (the paper) or standardize; auto: "
        + ", ".join(f"{v} on {k}" for k, v in AUTO_PREPROCESS.items()),
        ("auto", *PREPROCESS_CHOICES),
    ),
    "data.augment": Setting(str, "none", "on-device augmentation", _names(AUGMENT_CHOICES)),
    "data.val_size": Setting(
        int,
        "auto",
        "held-out training images (auto: 10%, at most 5000; 0: train on all)",
        also=("auto",),
    ),  # its range depends on the data set: the data module checks it
    "data.subset": Setting(int, None, "cap on the training images", also=(None,), low=1),
    "train.lr": Setting(float, 0.01, "SGD learning rate (paper grid: 0.25 0.1 0.05 0.01)", above=0),
    "train.warmup_epochs": Setting(
        float, 0.0, "linear lr warm-up from 0, in epochs (not in the paper: 0)", low=0
    ),
    "train.lr_gamma": Setting(
        float, 0.1, "lr factor at 200, 250, 300 of 350 epochs", above=0, high=1
    ),
    "train.momentum": Setting(float, 0.9, "SGD momentum", low=0, high=1),
    "train.weight_decay": Setting(float, 0.001, "L2 weight decay", low=0),
    "train.epochs": Setting(int, 350, "epochs", low=1),
    "train.batch_size": Setting(int, 128, "training batch size", low=1),
    "train.eval_batch_size": Setting(int, 1024, "evaluation batch size (no gradients)", low=1),
    "train.precision": Setting(
        str,
        "auto",
        "auto: bf16 mixed where computed natively (CUDA >= 8.0, AVX512-BF16/AMX), else 32; "
        "32 is 32-bit throughout (no TF32); tf32: TF32 matmuls and convolutions on CUDA",
        _names(PRECISIONS),
    ),
    "train.compile": Setting(bool, False, "torch.compile the network"),
    "train.deterministic": Setting(
        bool,
        False,
        "deterministic algorithms, no cuDNN autotuning: a re-run on a GPU repeats its numbers "
        "(slower; CPU runs repeat theirs anyway)",
    ),
    "train.accelerator": Setting(str, "auto", "Lightning accelerator", ("auto", "cpu", "gpu")),
    "seed": Setting(int, 0, "seeds data split, init, order and augmentation", low=0, high=MAX_SEED),
}

# Keys that only say where or how fast, not what is computed: left out of the cell identity.
OPERATIONAL = ("data.dir", "train.accelerator", "train.compile", "train.deterministic")


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
    """Check one value against its key's type, choices and bounds; strings are parsed."""
    setting = check_key(key)
    if isinstance(value, str) and setting.type is not str:
        value = value.strip()
        if value.lower() in ("none", "null", "") and None in setting.also:
            return None
        if value in setting.also:
            return value
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if isinstance(value, str) and setting.type is float:
        # YAML 1.1 reads 1e-3 (no dot) as a string; Python reads every spelling of a number
        try:
            value = float(value)
        except ValueError:
            pass
    if value in setting.also and (value is None or isinstance(value, str)):
        return value
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        bool: isinstance(value, bool),
    }[setting.type]
    if not ok:
        raise SettingsError(f"{key}={value!r} has the wrong type: expected {setting.kind}")
    if setting.type is float:
        value = float(value)
        if not math.isfinite(value):
            raise SettingsError(f"{key}={value!r} must be a finite number")
    if setting.choices is not None and value not in setting.choices:
        raise SettingsError(
            f"{key}={value!r} is not one of the valid values: {', '.join(setting.choices)}"
        )
    _check_bounds(key, setting, value)
    return value


def _check_bounds(key: str, setting: Setting, value: Any) -> None:
    if setting.type not in (int, float):
        return
    if setting.above is not None and not value > setting.above:
        raise SettingsError(
            f"{key}={value} must be positive"
            if setting.above == 0
            else f"{key}={value} must be above {setting.above:g}"
        )
    if setting.low is not None and value < setting.low:
        what = f"at least {_num(setting.low)}"
        raise SettingsError(f"{key}={value} must be {what}")
    if setting.high is not None and value > setting.high:
        raise SettingsError(f"{key}={value} must be at most {_num(setting.high)}")


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`key=value` strings from the command line, checked one by one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{item!r} is not a key=value setting (e.g. model.head=fc)")
        key = key.strip()
        if key in out:
            raise SettingsError(f"{key} is given twice ({out[key]!r} and {raw!r}); give it once")
        out[key] = coerce(key, raw)
    return out


# The settings of a run, in two shapes. `Settings`: every key of SCHEMA, checked, with
# `data.preprocess=auto` replaced by what it means for the data set (what a run is given).
# `Recorded`: Settings with the variant expanded into its slots and `model.name` added (what
# a run records: settings.yaml, the trial's record, the dataframe's columns).
Settings = NewType("Settings", dict[str, Any])
Recorded = NewType("Recorded", dict[str, Any])


def resolve(overrides: dict[str, Any]) -> Settings:
    """Defaults + overrides, every value checked, the model spec validated."""
    settings = defaults()
    for key, value in overrides.items():
        settings[key] = coerce(key, value)
    if settings["data.preprocess"] == "auto":
        settings["data.preprocess"] = AUTO_PREPROCESS[settings["data.dataset"]]
    model_spec(settings)  # validates the combination at a nominal input shape
    return Settings(settings)


def model_spec(
    settings: dict[str, Any], in_channels: int = 3, in_size: int = 32, num_classes: int = 10
) -> family.ModelSpec:
    return family.spec_from_settings(settings, in_channels, in_size, num_classes)


def recorded(settings: Settings, spec: family.ModelSpec | None = None) -> Recorded:
    """What a run records of its settings: the variant expanded into the slots, and
    `model.name` (spec: the network as built, default the one at a nominal input)."""
    spec = spec or model_spec(settings)
    out = dict(settings)
    out.update(spec.settings())
    out["model.variant"] = spec.variant
    out["model.name"] = spec.name
    return Recorded(out)


def from_recorded(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded settings (settings.yaml) back into overrides for `resolve`: derived
    keys dropped, the variant kept, or its slots where it is not a paper variant."""
    derived = {"model.name", "data.files", "model.pooling", "model.strided_conv"}
    out = {k: v for k, v in saved.items() if k in SCHEMA and k not in derived}
    if saved.get("model.variant") is None:
        out.pop("model.variant", None)
        out["model.pooling"] = saved["model.pooling"]
        out["model.strided_conv"] = saved["model.strided_conv"]
    return out
