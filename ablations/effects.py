"""The ablation itself: each swept factor's levels against a reference level, paired.

For a factor such as `model.variant`, a pair is two complete trials that agree on every other
swept setting, the seed included (All-CNN-C against Model C at the same base, rate and seed),
so the difference is the factor's and not the seed's or the rate's. Per (factor, level): the
mean difference, a 95% interval of it (bootstrap, or Student's t for few pairs), a paired
t-test's p-value, Holm-corrected across every comparison of the export, and the number of
pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
RESAMPLES = 10_000
# Below this many pairs the interval is Student's t, not the bootstrap: resampling 2 or 3
# differences only spans their range, which reads as far more certain than it is.
BOOTSTRAP_MIN_PAIRS = 10
COLUMNS = (
    "factor",
    "level",
    "reference",
    "metric",
    "pairs",
    "mean_diff",
    "ci_low",
    "ci_high",
    "ci_method",
    "p_value",
    "p_holm",
)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down correction; NaN p-values stay NaN and are not counted."""
    idx = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: p_values[i])
    m, running = len(order), 0.0
    out = [math.nan] * len(p_values)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% Student's t-interval of a mean (NaN with fewer than 2 values)."""
    if len(values) < 2:
        return math.nan, math.nan
    from scipy import stats

    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * values.std(ddof=1)
    half /= math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def interval(diffs: np.ndarray, seed: int = 0) -> tuple[float, float, str]:
    """A 95% interval of the mean difference and its method: the percentile bootstrap from
    BOOTSTRAP_MIN_PAIRS pairs on, Student's t below (NaN with fewer than 2 pairs; the point
    itself when every difference is equal)."""
    if len(diffs) < 2:
        return math.nan, math.nan, ""
    if np.all(diffs == diffs[0]):
        return float(diffs[0]), float(diffs[0]), "exact"
    from scipy import stats

    if len(diffs) < BOOTSTRAP_MIN_PAIRS:
        return (*t_interval(diffs), "t")

    res = stats.bootstrap(
        (diffs,),
        np.mean,
        confidence_level=CONFIDENCE,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high), "bootstrap"


def p_value(diffs: np.ndarray) -> float:
    """Two-sided paired t-test of mean difference 0 (NaN with fewer than 2 pairs)."""
    if len(diffs) < 2:
        return math.nan
    if np.all(diffs == diffs[0]):
        return 1.0 if diffs[0] == 0 else 0.0
    from scipy import stats

    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def effects(
    trials: pd.DataFrame, factors: dict[str, list], metric: str, keys: Sequence[str]
) -> pd.DataFrame:
    """One row per (factor, level != reference). `factors` maps each swept factor to its
    levels in the sweep file's order (the first is the reference); `keys` are every swept
    key, seed included, that a pair must agree on."""
    done = trials[trials["state"] == "complete"].copy()
    done[metric] = pd.to_numeric(done[metric], errors="coerce")
    done = done[done[metric].notna()]
    rows = []
    for factor, levels in factors.items():
        if len(levels) < 2:
            continue
        others = [k for k in keys if k != factor]
        ref = levels[0]
        for level in levels[1:]:
            a = done[done[factor].map(repr) == repr(level)]
            b = done[done[factor].map(repr) == repr(ref)]
            if others:
                merged = a.merge(b, on=others, suffixes=("", "_ref"))
            else:
                merged = a.assign(_k=0).merge(b.assign(_k=0), on="_k", suffixes=("", "_ref"))
                merged = merged.iloc[:0] if len(a) != 1 or len(b) != 1 else merged
            diffs = (merged[metric] - merged[f"{metric}_ref"]).to_numpy(dtype=float)
            low, high, method = interval(diffs)
            rows.append(
                {
                    "factor": factor,
                    "level": level,
                    "reference": ref,
                    "metric": metric,
                    "pairs": len(diffs),
                    "mean_diff": float(diffs.mean()) if len(diffs) else math.nan,
                    "ci_low": low,
                    "ci_high": high,
                    "ci_method": method,
                    "p_value": p_value(diffs),
                }
            )
    out = pd.DataFrame(rows, columns=list(COLUMNS))
    out["p_holm"] = holm(out["p_value"].tolist()) if len(out) else []
    return out
