"""Which cells no other cell beats on both error and cost: the Pareto-optimal rows of the
summary on a metric's seed mean against each cost (params, MACs, training time), and, for a
multi-objective sweep, the study's own front of its objectives."""

from __future__ import annotations

import math

import optuna
import pandas as pd

# each cost as the summary holds it, and how people read it
COSTS = {"params": "params", "macs": "macs", "fit_seconds": "fit_seconds mean"}
COST_LABELS = {"params": "Params", "macs": "MACs", "fit_seconds": "Training (s)"}


def column(cost: str) -> str:
    return f"pareto {cost}"


def front(errors: list[float], costs: list[float]) -> list[bool]:
    """For each point (error, cost), both lower-is-better: whether no other point is at least
    as good on both and better on one. A point with a missing value is on no front."""
    ok = [not (_missing(e) or _missing(c)) for e, c in zip(errors, costs)]
    out = []
    for i, (e, c) in enumerate(zip(errors, costs)):
        if not ok[i]:
            out.append(False)
            continue
        beaten = any(
            ok[j] and errors[j] <= e and costs[j] <= c and (errors[j] < e or costs[j] < c)
            for j in range(len(errors))
            if j != i
        )
        out.append(not beaten)
    return out


def _missing(v: object) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def mark(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The summary with a `pareto <cost>` column per cost: the row is on the front of the
    metric's mean against that cost (over the rows that have both)."""
    out = summary.copy()
    errors = [float(v) for v in pd.to_numeric(out[f"{metric} mean"], errors="coerce")]
    for cost, col in COSTS.items():
        if col not in out:
            continue
        costs = [float(v) for v in pd.to_numeric(out[col], errors="coerce")]
        out[column(cost)] = front(errors, costs)
    return out


def table(summary: pd.DataFrame, metric: str, label_of) -> pd.DataFrame:
    """The front as people read it: each row's error (mean ± std), its costs, and the costs
    against which it is Pareto-optimal."""
    rows = []
    for _, r in summary.iterrows():
        on = [COST_LABELS[c] for c in COSTS if r.get(column(c)) is True]
        mean, std = r.get(f"{metric} mean"), r.get(f"{metric} std")
        fit, fit_sd = r.get("fit_seconds mean"), r.get("fit_seconds std")
        rows.append(
            {
                "Model": label_of(r),
                label_of(metric): "–" if _missing(mean) else (
                    f"{mean:.2f}" if _missing(std) else f"{mean:.2f} ± {std:.2f}"
                ),
                "Params": "–" if _missing(r.get("params")) else f"{int(r['params']):,}",
                "MACs": "–" if _missing(r.get("macs")) else f"{int(r['macs']):,}",
                "Training (s)": "–" if _missing(fit) else (
                    f"{fit:.0f}" if _missing(fit_sd) else f"{fit:.0f} ± {fit_sd:.0f}"
                ),
                "Pareto-optimal against": ", ".join(on) or "–",
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


def study_front(study: optuna.Study) -> set[int]:
    """A multi-objective study's own front: the numbers of its Pareto-optimal trials."""
    if len(study.directions) < 2:
        return set()
    return {t.number for t in study.best_trials}
