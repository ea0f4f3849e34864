"""The `parameters:` block of a sweep file: W&B's parameter forms and distributions, each
checked against the setting it sweeps (settings.SCHEMA) and turned into an Optuna range."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ablations import settings
from ablations.settings import SettingsError, check_key, suggest

PARAM_KEYS = ("value", "values", "distribution", "min", "max", "q", "mu", "sigma", "probabilities")
PARAM_KEYS += ("a", "b")  # beta's, refused below with the nearest distribution
# W&B's distributions that map onto Optuna's: name -> (log scale, min/max given as exponents)
RANGES = {
    "uniform": (False, False),
    "int_uniform": (False, False),
    "q_uniform": (False, False),
    "log_uniform_values": (True, False),
    "q_log_uniform_values": (True, False),
    # 1/X log-uniform between 1/max and 1/min is X log-uniform between min and max
    "inv_log_uniform_values": (True, False),
    "log_uniform": (True, True),  # X = exp(U(min, max))
    "q_log_uniform": (True, True),
    "inv_log_uniform": (True, True),  # X = exp(-U(min, max))
}
DISTRIBUTIONS = ("constant", "categorical", *RANGES)
# W&B's distributions with no bounded range: refused, naming the nearest that works
UNBOUNDED = {
    "normal": "uniform with min: mu - 2*sigma and max: mu + 2*sigma",
    "q_normal": "q_uniform with min: mu - 2*sigma, max: mu + 2*sigma and the same q",
    "log_normal": "log_uniform_values with min: exp(mu - 2*sigma) and max: exp(mu + 2*sigma)",
    "q_log_normal": "log_uniform_values with min: exp(mu - 2*sigma), max: exp(mu + 2*sigma)",
    "beta": "uniform with min: 0 and max: 1",
    "q_beta": "q_uniform with min: 0, max: 1 and the same q",
}
WEIGHTED = (
    "Optuna draws categorical values with equal probability; the nearest that works: the "
    "same values without probabilities (distribution categorical)"
)


class SweepError(ValueError):
    """A bad sweep file or a sweep that cannot start; the message names the key."""


@dataclass(frozen=True)
class Param:
    key: str
    values: tuple | None = None  # `value` or `values`
    distribution: str | None = None  # as the file names it
    low: float | None = None  # the setting's own range, after any exp() of W&B's exponents
    high: float | None = None
    step: float | None = None  # q_*: the values are multiples of it
    log: bool = False

    @property
    def fixed(self) -> bool:
        return self.values is not None and len(self.values) == 1 and self.distribution is None


def _err(msg: str) -> SweepError:
    return SweepError(msg)


def _check_keys(where: str, got: dict, valid: tuple[str, ...]) -> None:
    for key in got:
        if key not in valid:
            raise _err(
                f"{where}: unknown key {key!r}{suggest(str(key), valid)} "
                f"(valid keys: {', '.join(valid)})"
            )


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """W&B's nested `parameters:` blocks as dotted keys: `model: {parameters: {width: ...}}`
    is `model.width`."""
    if not isinstance(params, dict):
        raise _err(f"parameters{'.' + prefix.rstrip('.') if prefix else ''}: expected a mapping")
    out: dict[str, Any] = {}
    for key, spec in params.items():
        if isinstance(spec, dict) and set(spec) == {"parameters"}:
            out.update(flatten(spec["parameters"], f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = spec
    return out


def param(key: str, spec: Any) -> Param:
    where = f"parameters.{key}"
    if not isinstance(spec, dict):
        raise _err(
            f"{where}: expected a mapping with one of value, values, distribution; got {spec!r}"
        )
    _check_keys(where, spec, PARAM_KEYS)
    kind = check_key(key).type.__name__

    def checked(v: Any) -> Any:
        try:
            return settings.coerce(key, v)
        except SettingsError as err:
            raise _err(f"{where}: {err}") from None

    dist = spec.get("distribution")
    if dist == "categorical_w_probabilities":
        raise _err(f"{where}.distribution=categorical_w_probabilities: {WEIGHTED}")
    if dist in UNBOUNDED:
        raise _err(
            f"{where}.distribution={dist} has no bounded range, which a sweep over a model "
            f"setting needs; the nearest that works: {UNBOUNDED[dist]}"
        )
    if {"a", "b"} & set(spec):
        raise _err(f"{where}: a and b are the shape of W&B's beta distribution, not of {dist}")
    if dist is not None and dist not in DISTRIBUTIONS:
        raise _err(
            f"{where}.distribution={dist!r} is not one of the valid values: "
            f"{', '.join(DISTRIBUTIONS)}"
        )
    if "value" in spec:
        extra = sorted(set(spec) - {"value", "distribution"})
        if extra or dist not in (None, "constant"):
            raise _err(f"{where}: 'value' cannot be combined with {extra or dist}")
        return Param(key, (checked(spec["value"]),))
    if dist == "constant":
        raise _err(f"{where}: distribution constant needs 'value'")
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list):
            raise _err(f"{where}.values: expected a list, got {values!r}")
        if not values:
            raise _err(f"{where}.values is empty: give at least one value")
        extra = sorted({"min", "max", "q", "mu", "sigma"} & set(spec))
        if extra:
            raise _err(f"{where}: 'values' cannot be combined with {', '.join(extra)}")
        if dist not in (None, "categorical"):
            raise _err(f"{where}: 'values' goes with distribution categorical, not {dist!r}")
        if "probabilities" in spec:
            raise _err(f"{where}.probabilities: {WEIGHTED}")
        coerced = tuple(checked(v) for v in values)
        if len(set(map(repr, coerced))) != len(coerced):
            raise _err(f"{where}.values has duplicates: {values}")
        return Param(key, coerced)
    if "min" not in spec or "max" not in spec:
        raise _err(f"{where}: give 'value', 'values', or 'min' and 'max' with a distribution")
    if dist is None:
        dist = "int_uniform" if kind == "int" else "uniform"
    if dist == "categorical":
        raise _err(f"{where}: distribution categorical needs 'values'")
    if kind not in ("int", "float"):
        raise _err(f"{where}: a {dist} distribution needs a numeric setting; {key} is {kind}")
    log, exponents = RANGES[dist]
    if exponents:
        if not all(isinstance(spec[k], int | float) for k in ("min", "max")):
            raise _err(f"{where}: min and max of {dist} are numbers (exponents of e)")
        ends = sorted(
            math.exp(-x if dist.startswith("inv_") else x) for x in (spec["min"], spec["max"])
        )
        lo, hi = (
            checked(ends[0] if kind == "float" else round(ends[0])),
            checked(ends[1] if kind == "float" else round(ends[1])),
        )
    else:
        lo, hi = checked(spec["min"]), checked(spec["max"])
    if dist == "int_uniform" and kind != "int":
        raise _err(f"{where}: int_uniform needs an integer setting; {key} is {kind}")
    if not lo < hi:
        raise _err(f"{where}: min ({lo}) must be below max ({hi})")
    if log and lo <= 0:
        raise _err(f"{where}: {dist} needs min > 0, got {lo}")
    step = None
    if dist.startswith("q_"):
        q = spec.get("q", 1)
        if not isinstance(q, int | float) or isinstance(q, bool) or q <= 0:
            raise _err(f"{where}.q={q!r} must be a positive number")
        if kind == "int" and q != int(q):
            raise _err(f"{where}.q={q}: {key} is an integer setting, so q must be one too")
        if log and (kind == "float" or q != 1):
            # Optuna draws on a log scale or on a grid of steps, not both (q 1 on an integer)
            raise _err(
                f"{where}: {dist} with q={q} on a log scale is not one of Optuna's "
                "distributions; the nearest that works: log_uniform_values, or q_uniform "
                "on a linear scale"
            )
        step = int(q) if kind == "int" else float(q)
        if (hi - lo) / step < 1:
            raise _err(f"{where}: q={q} is wider than the range [{lo}, {hi}]")
    elif "q" in spec:
        raise _err(f"{where}: q goes with a q_* distribution, not {dist}")
    return Param(key, None, dist, lo, hi, step, log)
