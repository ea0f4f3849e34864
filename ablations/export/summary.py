"""The summary over seeds (mean and sample std per cell), the selection of a setting per
cell on a validation metric, and the paper's Table 3 beside the rows that may stand there."""

from __future__ import annotations

import math
from importlib import resources

import pandas as pd

from ablations.protocol import differences
from ablations.sweep_file import Sweep


def paper_table() -> pd.DataFrame:
    with resources.files("ablations").joinpath("data/table3.csv").open() as f:
        return pd.read_csv(f)


def cell_keys(sweep: Sweep, over: list[str]) -> list[str]:
    return [k for k in sweep.swept if k != "seed" and k not in over]


def seed_count(sweep: Sweep) -> int:
    p = sweep.params.get("seed")
    return len(p.values) if p is not None and p.values is not None else 1


def _cells(trials: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per distinct `keys`: n, n_failed, mean and sample std of each metric."""
    rows = []
    grouped = trials.groupby(keys, sort=False, dropna=False) if keys else [((), trials)]
    for values, g in grouped:
        values = values if isinstance(values, tuple) else (values,)
        done = g[g["state"] == "complete"]
        row = dict(zip(keys, values))
        first = (done if len(done) else g).iloc[0]
        row["model.name"] = first["model.name"]
        if "model.base" not in keys:
            row["model.base"] = first["model.base"]
        row["n"] = len(done)
        row["n_failed"] = int(g["state"].isin(["failed", "diverged"]).sum())
        row["n_diverged"] = int((g["state"] == "diverged").sum())
        row["n_pruned"] = int((g["state"] == "pruned").sum())
        row["n_running"] = int((g["state"] == "running").sum())
        for m in metrics:
            vals = pd.to_numeric(done[m], errors="coerce").dropna()
            row[f"{m} mean"] = vals.mean() if len(vals) else math.nan
            row[f"{m} std"] = vals.std(ddof=1) if len(vals) > 1 else math.nan
        row["params"] = first["params"]
        row["macs"] = first.get("macs", math.nan)
        # what training the cell cost, over the seeds that completed: a Pareto axis
        fit = pd.to_numeric(done["fit_seconds"], errors="coerce").dropna()
        row["fit_seconds mean"] = fit.mean() if len(fit) else math.nan
        row["fit_seconds std"] = fit.std(ddof=1) if len(fit) > 1 else math.nan
        row["_first"] = first
        rows.append(row)
    return pd.DataFrame(rows)


def _mixed_precision(trials: pd.DataFrame, keys: list[str]) -> bool:
    """Whether the trials of any one cell ran at more than one resolved precision."""
    if not keys:
        return trials["precision"].dropna().nunique() > 1
    return bool((trials.groupby(keys, dropna=False)["precision"].nunique() > 1).any())


def summarize(
    trials: pd.DataFrame,
    sweep: Sweep,
    metrics: list[str],
    select_by: str | None = None,
    over: list[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str]]:
    """(summary, selection, notes): one summary row per cell (over seeds); with `select_by`,
    the `over` setting chosen per cell and every candidate in `selection`; notes say why the
    paper's numbers are missing where they are."""
    over = over or []
    keys = cell_keys(sweep, over)
    if "precision" in trials and _mixed_precision(trials, keys + over):
        # seeds of one cell that resolved `train.precision` differently (auto on two kinds
        # of machine, say) are two cells, never one mean
        keys.append("precision")
    summary = _cells(trials, keys + over, metrics)
    selection = None
    if select_by is not None and over:
        summary, selection = _select(summary, keys, over, select_by, sweep)
    for col in ("n_diverged", "n_pruned", "n_running"):
        if col in summary and not summary[col].any():
            summary = summary.drop(columns=[col])
    summary, notes = _join_paper(summary, sweep, select_by, over)
    return summary.drop(columns=["_first"]).reset_index(drop=True), selection, notes


def _ineligible(row: pd.Series, seeds: int, metric: str) -> str | None:
    """Why a candidate cannot be selected, or None: every seed must have completed, so a
    rate at which some seeds diverged cannot win on its survivors."""
    counts = {
        "diverged": row.get("n_diverged", 0),
        "failed": row.get("n_failed", 0) - row.get("n_diverged", 0),
        "pruned": row.get("n_pruned", 0),
        "running": row.get("n_running", 0),
    }
    bad = [f"{int(n)} {what}" for what, n in counts.items() if n]
    if bad:
        return f"{', '.join(bad)} of {seeds} seeds"
    if row["n"] < seeds:
        return f"{int(row['n'])} of {seeds} seeds complete"
    if pd.isna(row[f"{metric} mean"]):
        return f"no {metric}"
    return None


def _select(
    summary: pd.DataFrame, keys: list[str], over: list[str], metric: str, sweep: Sweep
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per cell, keep the `over` setting with the best mean `metric` among those whose seeds
    all completed (the paper's protocol, without survivors)."""
    col = f"{metric} mean"
    maximize = sweep.goal == "maximize" and metric == sweep.metric
    seeds = seed_count(sweep)
    summary = summary.copy()
    summary["eligible"] = [_ineligible(r, seeds, metric) is None for _, r in summary.iterrows()]
    summary["why_not"] = [_ineligible(r, seeds, metric) or "" for _, r in summary.iterrows()]
    summary["selected"] = False
    picked = []
    groups = summary.groupby(keys, sort=False, dropna=False) if keys else [((), summary)]
    for _, g in groups:
        ok = g[g["eligible"]]
        if ok.empty:
            row = g.iloc[[0]].copy()
            for c in row.columns:
                if c.endswith((" mean", " std")):
                    row[c] = math.nan
            for k in over:
                row[k] = None
            row["n"] = 0
            row["selected_by"] = f"{metric}: no eligible {', '.join(over)}"
            picked.append(row)
            continue
        best = ok[col].idxmax() if maximize else ok[col].idxmin()
        summary.loc[best, "selected"] = True
        row = summary.loc[[best]].copy()
        row["selected_by"] = metric
        picked.append(row)
    out = pd.concat(picked).drop(columns=["eligible", "why_not", "selected"])
    cols = [c for c in out.columns if c != "selected_by"]
    out = out[cols[: len(keys) + len(over)] + ["selected_by"] + cols[len(keys) + len(over) :]]
    shown = [
        *keys,
        *over,
        "model.name",
        "n",
        "n_failed",
        f"{metric} mean",
        f"{metric} std",
        "eligible",
        "why_not",
        "selected",
    ]
    return out, summary[[c for c in shown if c in summary]].reset_index(drop=True)


def lr_selection(
    sweep: Sweep, select_by: str | None, over: list[str]
) -> tuple[list[float] | None, str | None]:
    """The rates a row's rate was chosen from and the metric it was chosen on, if it was:
    here (`--select-by ... --over train.lr`) or by the study a final sweep came from."""
    if select_by is not None and "train.lr" in over:
        return list(sweep.params["train.lr"].values or ()), select_by  # none: continuous
    chosen = sweep.selection or {}
    if "train.lr" in (chosen.get("over") or {}):
        return list(chosen["over"]["train.lr"]), chosen.get("by")
    return None, None


def _join_paper(
    summary: pd.DataFrame, sweep: Sweep, select_by: str | None, over: list[str]
) -> tuple[pd.DataFrame, list[str]]:
    """Table 3's number beside each row that is a paper model run on the paper's protocol
    (ablations/protocol.py); otherwise none, and a note that says which settings differ."""
    paper = dict(zip(paper_table()["name"], paper_table()["test_error_pct"]))
    candidates, by = lr_selection(sweep, select_by, over)
    ref, diff, off = [], [], []
    for _, row in summary.iterrows():
        value = paper.get(row["model.name"])
        if value is not None:
            why = differences(row["_first"], candidates, by)
            if row.get("n", 0) == 0:
                why.append("no completed trial")
            if why:
                off.extend(w for w in why if w not in off)
                value = None
        ref.append(value)
        mean = row.get("test/error mean")
        diff.append(mean - value if value is not None and not pd.isna(mean) else None)
    summary = summary.copy()
    summary["paper test/error"] = pd.array(ref, dtype="Float64")
    summary["Δ test/error"] = pd.array(diff, dtype="Float64")
    notes = []
    if not any(n in paper for n in summary["model.name"]):
        notes.append("paper numbers omitted: no row is one of Table 3's models")
    elif off:
        notes.append(
            "paper numbers omitted"
            + (" for some rows" if summary["paper test/error"].notna().any() else "")
            + ": "
            + ", ".join(off)
        )
    if summary["paper test/error"].isna().all():
        summary = summary.drop(columns=["paper test/error", "Δ test/error"])
    return summary, notes
