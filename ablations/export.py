"""The ablation dataframe (one row per trial, read from the study) and its paper exports."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml

from ablations import effects as EF
from ablations import protocol as P
from ablations import settings as S
from ablations import storage as ST
from ablations import study as SD
from ablations import sweep_file as SF

FORMATS = ("csv", "md", "tex", "png", "pdf")
DEFAULT_METRICS = ("val/error", "test/error")
RESULT_COLUMNS = (
    "params",
    "macs",
    "val/error",
    "test/error",
    "test/error_dropout",
    "best_epoch",
    "epochs_run",
    "fit_seconds",
    "images_per_second",
    "precision",
    "device",
    "wandb_run_id",
    "git_commit",
)
STATE_ORDER = {
    "complete": 0,
    "diverged": 1,
    "pruned": 2,
    "failed": 3,
    "interrupted": 4,
    "running": 5,
}


class ExportError(ValueError):
    """Bad export input: the message names it and what is valid."""


# --- the dataframe ---------------------------------------------------------------------------


def _settings_of(t: optuna.trial.FrozenTrial, sweep: SF.Sweep) -> dict[str, Any]:
    stored = t.user_attrs.get("settings")
    if stored:
        return dict(stored)
    # failed before its settings were resolved: rebuild what we can from the file and params
    raw = S.concrete({**S.defaults(), **sweep.base, **t.params})
    try:
        return S.flat_with_name(raw, S.model_spec(raw))
    except ValueError:
        return {**raw, "model.name": None}


def trials_frame(study: optuna.Study, sweep: SF.Sweep | None = None) -> pd.DataFrame:
    """Every trial of the study as one tidy row, failed, pruned and running ones included."""
    sweep = sweep or SD.stored_sweep(study)
    setting_keys = [k for k in S.SCHEMA if k != "seed"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.WAITING:
            continue
        s = _settings_of(t, sweep)
        row: dict[str, Any] = {
            "study": study.study_name,
            "trial": t.number,
            "state": SD.trial_state(t),
            "model.name": s.get("model.name"),
        }
        row.update({k: s.get(k) for k in setting_keys})
        row["seed"] = s.get("seed")
        row.update({k: t.user_attrs.get(k) for k in RESULT_COLUMNS})
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["datetime_complete"] = t.datetime_complete.isoformat() if t.datetime_complete else None
        row["error_message"] = t.user_attrs.get("error_message")
        rows.append(row)
    columns = [
        "study",
        "trial",
        "state",
        "model.name",
        *setting_keys,
        "seed",
        *RESULT_COLUMNS,
        "datetime_start",
        "datetime_complete",
        "error_message",
    ]
    df = pd.DataFrame(rows, columns=columns)
    return _ordered(df, sweep)


def _ordered(df: pd.DataFrame, sweep: SF.Sweep) -> pd.DataFrame:
    """Rows by swept factor (in the file's order of values), then seed, then trial."""
    keys, sort_cols = [], []
    for key in [k for k in sweep.swept if k != "seed"] + ["seed", "trial"]:
        if key not in df:
            continue
        col = f"__order_{key}"
        values = sweep.params[key].values if key in sweep.params else None
        if values is not None:
            rank = {repr(v): i for i, v in enumerate(values)}
            df[col] = df[key].map(lambda v, r=rank: r.get(repr(v), len(r)))
        else:
            df[col] = df[key]
        keys.append(col)
        sort_cols.append(col)
    df = df.sort_values(sort_cols, kind="stable").drop(columns=keys)
    return df.reset_index(drop=True)


# --- the summary ---------------------------------------------------------------------------


def paper_table() -> pd.DataFrame:
    with resources.files("ablations").joinpath("data/table3.csv").open() as f:
        return pd.read_csv(f)


def cell_keys(sweep: SF.Sweep, over: list[str]) -> list[str]:
    return [k for k in sweep.swept if k != "seed" and k not in over]


def seed_count(sweep: SF.Sweep) -> int:
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
    sweep: SF.Sweep,
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
    summary: pd.DataFrame, keys: list[str], over: list[str], metric: str, sweep: SF.Sweep
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
    sweep: SF.Sweep, select_by: str | None, over: list[str]
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
    summary: pd.DataFrame, sweep: SF.Sweep, select_by: str | None, over: list[str]
) -> tuple[pd.DataFrame, list[str]]:
    """Table 3's number beside each row that is a paper model run on the paper's protocol
    (ablations/protocol.py); otherwise none, and a note that says which settings differ."""
    paper = dict(zip(paper_table()["name"], paper_table()["test_error_pct"]))
    candidates, by = lr_selection(sweep, select_by, over)
    ref, diff, off = [], [], []
    for _, row in summary.iterrows():
        value = paper.get(row["model.name"])
        if value is not None:
            why = P.differences(row["_first"], candidates, by)
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


# --- labels and writers --------------------------------------------------------------------

UNITS = {
    "val/error": "%",
    "test/error": "%",
    "test/error_dropout": "%",
    "paper test/error": "%",
    "Δ test/error": "points",
}
LABELS = {
    "model.name": "Model",
    "n": "Seeds",
    "n_failed": "Failed",
    "n_diverged": "Diverged",
    "n_pruned": "Pruned",
    "n_running": "Running",
    "params": "Params",
    "val/error": "Val. error (%)",
    "test/error": "Test error (%)",
    "test/error_dropout": "Test error, dropout on (%)",
    "val/loss": "Val. loss",
    "train/loss": "Train loss",
    "paper test/error": "Paper (%)",
    "Δ test/error": "Δ (points)",
    "selected_by": "Selected by",
    "train.lr": "LR",
    "precision": "Ran in",  # the resolved precision, beside the setting (train.precision)
    "model.score_relu": "Score ReLU",
}
LOWER_IS_BETTER = ("val/error", "test/error", "test/error_dropout", "val/loss", "train/loss")


def label(key: str) -> str:
    """A column header a reader understands: `model.strided_conv` -> `Strided conv`."""
    if key in LABELS:
        return LABELS[key]
    return key.split(".")[-1].replace("_", " ").capitalize()


def _fmt(mean: Any, std: Any) -> str:
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if std is not None and not pd.isna(std) else f"{mean:.2f}"


def _redundant(summary: pd.DataFrame) -> list[str]:
    """Slot columns that the paper names already say (`All-CNN-C` is base C, all-cnn)."""
    paper = set(paper_table()["name"])
    if len(summary) and summary["model.name"].isin(paper).all():
        return ["model.base", "model.variant", "model.pooling", "model.strided_conv"]
    return []


def display_table(
    summary: pd.DataFrame, metrics: list[str], swept: list[str] = ()
) -> tuple[pd.DataFrame, set]:
    """(table, best): the summary as people read it, `mean ± std` in one cell per metric and
    readable headers; `best` holds the (row, header) cells with the best mean per column."""
    # the caption states the selection rule, so the column would repeat it on every row
    hidden = (
        [*_redundant(summary), "selected_by"]
        if summary.get("selected_by") is not None
        and (summary["selected_by"] == summary["selected_by"].iloc[0]).all()
        else _redundant(summary)
    )
    out = summary.drop(columns=[c for c in hidden if c in summary])
    best = set()
    for m in metrics:
        means = pd.to_numeric(summary[f"{m} mean"], errors="coerce")
        if m in LOWER_IS_BETTER and means.notna().sum() > 1:
            best |= {(i, label(m)) for i in means.index[means == means.min()]}
        out[m] = [_fmt(a, b) for a, b in zip(summary[f"{m} mean"], summary[f"{m} std"])]
        out = out.drop(columns=[f"{m} mean", f"{m} std"])
    for col in ("paper test/error", "Δ test/error"):
        if col in out:
            out[col] = [
                ("–" if pd.isna(v) else f"{v:+.2f}" if col.startswith("Δ") else f"{v:.2f}")
                for v in out[col]
            ]
    out["params"] = [f"{int(p):,}" if not pd.isna(p) else "–" for p in out["params"]]
    if "model.base" in out and "model.base" not in swept:
        out = out.drop(columns=["model.base"])
    first = ["model.name"]
    out = out[first + [c for c in out.columns if c not in first]]
    out.columns = [label(c) for c in out.columns]
    return out, best


def to_markdown(table: pd.DataFrame, best: set | None = None, notes: list[str] = ()) -> str:
    best = best or set()
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for i, r in table.iterrows():
        cells = []
        for c in cols:
            text = str(r[c]).replace("|", "\\|")
            cells.append(f"**{text}**" if (i, c) in best else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "/": r"/\allowbreak{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "–": "--",
    "≤": r"$\le$",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def _tex_cell(value: Any, bold: bool) -> str:
    text = str(value)
    if " ± " in text:
        a, b = text.split(" ± ")
        a = f"\\mathbf{{{a}}}" if bold else a
        return f"${a} \\pm {b}$"
    if text == "–":
        return "--"
    return f"\\textbf{{{tex_escape(text)}}}" if bold else tex_escape(text)


def to_latex(table: pd.DataFrame, caption: str, label_: str, best: set | None = None) -> str:
    """A booktabs table for `\\input`: needs booktabs and graphicx (the tabular is shrunk to
    the line width only when it is wider, so no box is ever overfull)."""
    best = best or set()
    cols = list(table.columns)

    def numeric(c: str) -> bool:
        return any(str(v)[:1].isdigit() or str(v)[:1] in "+-$–" for v in table[c]) and c not in (
            "Model",
        )

    align = "".join("r" if numeric(c) else "l" for c in cols)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        f"\\caption{{{tex_escape(caption)}}}",
        f"\\label{{{label_}}}",
        r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
        f"\\begin{{tabular}}{{@{{}}{align}@{{}}}}",
        r"\toprule",
        " & ".join(tex_escape(c) for c in cols) + r" \\",
        r"\midrule",
    ]
    for i, r in table.iterrows():
        lines.append(" & ".join(_tex_cell(r[c], (i, c) in best) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def caption(
    study: str,
    trials: pd.DataFrame,
    sweep: SF.Sweep,
    select_by: str | None,
    over: list[str],
    paper: bool,
) -> str:
    """Dataset, epochs, seeds, the class-score layer and the selection rule."""

    def values(key: str) -> str:
        vals = [v for v in pd.unique(trials[key].dropna())] if key in trials else []
        return ", ".join(str(v) for v in vals) or "?"

    relu = {"True": "with a ReLU (the paper's)", "False": "without a ReLU"}
    score = relu.get(values("model.score_relu"), "with and without a ReLU")
    planned = seed_count(sweep)
    complete = trials[trials["state"] == "complete"]
    keys = [k for k in sweep.swept if k != "seed" and k in complete]
    per_row = complete.groupby(keys)["seed"].nunique() if keys else complete["seed"].nunique()
    done = int(per_row.min()) if keys and len(per_row) else int(per_row) if not keys else 0
    seeds = f"{planned} seed(s)" if done >= planned else f"the completed seeds (Seeds) of {planned}"
    text = (
        f"{study}: errors in %, mean ± sample std over {seeds}; "
        f"{values('data.dataset')}, {values('train.epochs')} epochs; class-score layer "
        f"{score}."
    )
    if select_by:
        text += (
            f" {', '.join(label(k) for k in over)} chosen per model by the lowest mean "
            f"{select_by} among settings whose seeds all completed."
        )
    if paper:
        text += " Paper: Springenberg et al. (2015), Table 3."
    return text


# --- figures -------------------------------------------------------------------------------

WIDTH_IN = 3.3  # one column of a two-column paper


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 6,
            "axes.titlesize": 6,
            "axes.labelsize": 6,
            "xtick.labelsize": 5,
            "ytick.labelsize": 5,
            "legend.fontsize": 5,
            "pdf.fonttype": 42,
        }
    )
    return plt


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% t-interval of a mean (NaN with fewer than 2 values)."""
    if len(values) < 2:
        return math.nan, math.nan
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def figure(
    summary: pd.DataFrame,
    trials: pd.DataFrame,
    sweep: SF.Sweep,
    metric: str,
    over: list[str],
    paths: list[Path],
) -> None:
    """Every seed as a point, the mean and its 95% interval, models grouped by base with
    their variants side by side, the paper's number as a cross where it is comparable."""
    plt = _pyplot()
    keys = [k for k in cell_keys(sweep, []) if k in summary]
    label_keys = [
        k
        for k in keys
        if k not in ("model.base", "model.variant", "model.pooling", "model.strided_conv")
    ]
    bases = list(pd.unique(summary["model.base"]))
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 2.3), layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x, ticks, labels, paper_shown = 0.0, [], [], False
    for base in bases:
        part = summary[summary["model.base"] == base]
        for j, (_, row) in enumerate(part.iterrows()):
            match = trials["state"] == "complete"
            for k in keys:
                if k in trials and not pd.isna(row[k]):
                    match &= trials[k].map(repr) == repr(row[k])
            vals = pd.to_numeric(trials.loc[match, metric], errors="coerce").dropna()
            colour = colours[j % len(colours)]
            # the seeds just left of the mean, spread so equal values stay visible
            jitter = np.linspace(-0.3, -0.1, len(vals)) if len(vals) > 1 else np.full(1, -0.2)
            ax.scatter(
                x + jitter[: len(vals)], vals, s=4, color=colour, alpha=0.6, linewidths=0, zorder=2
            )
            if len(vals):
                low, high = t_interval(vals.to_numpy(dtype=float))
                yerr = None if math.isnan(low) else [[vals.mean() - low], [high - vals.mean()]]
                ax.errorbar(
                    x + 0.1,
                    vals.mean(),
                    yerr=yerr,
                    fmt="o",
                    ms=3,
                    color=colour,
                    mec="black",
                    mew=0.4,
                    elinewidth=0.8,
                    capsize=1.5,
                    zorder=3,
                )
            paper = row.get("paper test/error")
            if metric == "test/error" and paper is not None and not pd.isna(paper):
                ax.plot(x, paper, marker="x", color="black", ms=3.5, mew=0.8, zorder=4)
                paper_shown = True
            extra = " ".join(f"{label(k)}={row[k]}" for k in label_keys if k in row)
            ticks.append(x)
            labels.append(f"{row['model.name']}" + (f"\n{extra}" if extra else ""))
            x += 1
        x += 0.5
    ax.set_xticks(ticks, labels, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_ylabel(label(metric))
    ax.set_xlim(-0.6, x - 0.9)
    ax.grid(axis="y", linewidth=0.3, alpha=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker=".", color="grey", label="seed"),
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            ms=3,
            color="grey",
            mec="black",
            mew=0.4,
            label="mean, 95% CI",
        ),
    ]
    if paper_shown:
        handles.append(Line2D([], [], ls="", marker="x", color="black", label="paper"))
    ax.legend(handles=handles, loc="best", frameon=False, handlelength=1)
    for path in paths:
        fig.savefig(path, dpi=300)
    plt.close(fig)


def forest(effects: pd.DataFrame, paths: list[Path]) -> None:
    """The effects as a forest plot: mean paired difference and its 95% interval per level."""
    plt = _pyplot()
    rows = effects.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.6 + 0.22 * max(1, len(rows))), layout="constrained")
    y = np.arange(len(rows))[::-1]
    for yi, (_, r) in zip(y, rows.iterrows()):
        sig = not pd.isna(r["p_holm"]) and r["p_holm"] < 0.05
        if not pd.isna(r["ci_low"]):
            ax.plot([r["ci_low"], r["ci_high"]], [yi, yi], color="black", lw=0.8)
        ax.plot(
            r["mean_diff"], yi, "o", ms=3, color="black" if sig else "white", mec="black", mew=0.6
        )
    ax.axvline(0, color="grey", lw=0.5, ls="--")
    ax.set_yticks(
        y,
        [
            f"{label(r['factor'])}: {r['level']} vs {r['reference']} (n={r['pairs']})"
            for _, r in rows.iterrows()
        ],
    )
    metric = rows["metric"].iloc[0] if len(rows) else "metric"
    unit = " (points)" if UNITS.get(metric) == "%" else ""
    ax.set_xlabel(f"Δ {label(metric).replace(' (%)', '')}{unit}, paired; filled: Holm p < 0.05")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for path in paths:
        fig.savefig(path, dpi=300)
    plt.close(fig)


# --- export --------------------------------------------------------------------------------


def resolve_study(name: str | None, url: str | None, runs_dir: Path) -> tuple[optuna.Study, str]:
    if name is not None:
        try:
            SF.check_study_name(name)
        except SF.SweepError as err:
            raise ExportError(str(err)) from None
    if url is None:
        journals = sorted(p.parent.name for p in runs_dir.glob("*/optuna.journal"))
        if name is None:
            if len(journals) != 1:
                raise ExportError(
                    "name the study to export; studies under "
                    f"{runs_dir}: {', '.join(journals) or 'none'}"
                )
            name = journals[0]
        url = ST.default_url(name, runs_dir)
        if not Path(url).exists():
            raise ExportError(
                f"unknown study {name!r}: studies under {runs_dir}: {', '.join(journals) or 'none'}"
            )
    try:
        storage = ST.open_storage(url)
    except SF.SweepError as err:
        raise ExportError(str(err)) from None
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not names:
        raise ExportError(f"storage {ST.describe_url(url)} has no studies")
    if name is None:
        if len(names) != 1:
            raise ExportError(
                f"name the study to export; studies in {ST.describe_url(url)}: {', '.join(names)}"
            )
        name = names[0]
    if name not in names:
        raise ExportError(
            f"unknown study {name!r}; studies in {ST.describe_url(url)}: {', '.join(names)}"
        )
    return optuna.load_study(study_name=name, storage=storage), url


@dataclass
class Tables:
    """Everything an export writes, made from the study alone."""

    trials: pd.DataFrame
    summary: pd.DataFrame
    selection: pd.DataFrame | None
    effects: pd.DataFrame
    sweep: SF.Sweep
    metrics: list[str]
    notes: list[str]
    select_by: str | None = None
    over: list[str] = field(default_factory=list)


def build(
    study: optuna.Study,
    *,
    metrics: list[str] | None = None,
    select_by: str | None = None,
    over: list[str] | None = None,
) -> Tables:
    """The export's tables, with its input checks."""
    sweep = SD.stored_sweep(study)
    trials = trials_frame(study, sweep)
    if trials.empty:
        raise ExportError(f"study {study.study_name} has no trials yet: nothing to export")
    metrics = list(metrics or DEFAULT_METRICS)
    over = list(over or [])
    available = [m for m in SF.METRICS if m in trials and trials[m].notna().any()]
    for m in metrics:
        if m not in SF.METRICS and m != "test/error_dropout":
            raise ExportError(f"--metrics {m}: not a metric; valid: {', '.join(SF.METRICS)}")
    if select_by is not None:
        if select_by.startswith("test/"):
            raise ExportError(
                f"--select-by {select_by}: choosing settings on the test set "
                "leaks it into the result; select on val/error or val/loss"
            )
        if select_by not in SF.METRICS:
            raise ExportError(
                f"--select-by {select_by}: not a metric; valid: "
                f"{', '.join(m for m in SF.METRICS if not m.startswith('test/'))}"
            )
        if select_by not in trials.columns or not trials[select_by].notna().any():
            raise ExportError(
                f"--select-by {select_by}: no trial has this metric; trials "
                f"have: {', '.join(available) or 'none'}"
            )
        if not over:
            raise ExportError("--select-by needs --over KEY (e.g. --over train.lr)")
        if select_by not in metrics:
            metrics.insert(0, select_by)
    elif over:
        raise ExportError("--over needs --select-by METRIC (e.g. --select-by val/error)")
    for key in over:
        if key not in sweep.swept or key == "seed":
            raise ExportError(
                f"--over {key}: not a swept factor of {study.study_name}; "
                f"swept: {', '.join(k for k in sweep.swept if k != 'seed')}"
            )
    summary, selection, notes = summarize(trials, sweep, metrics, select_by, over)
    metric = "test/error" if "test/error" in metrics else metrics[-1]
    factors = {
        k: list(sweep.params[k].values)
        for k in sweep.swept
        if k != "seed" and sweep.params[k].values is not None
    }
    effects = EF.effects(trials, factors, metric, [k for k in sweep.swept])
    return Tables(trials, summary, selection, effects, sweep, metrics, notes, select_by, over)


def effects_table(effects: pd.DataFrame) -> pd.DataFrame:
    """effects.csv as people read it."""

    def num(v: float, fmt: str) -> str:
        return "–" if pd.isna(v) else format(v, fmt)

    rows = []
    for _, r in effects.iterrows():
        unit = UNITS.get(r["metric"], "")
        rows.append(
            {
                "Factor": label(r["factor"]),
                "Level": str(r["level"]),
                "Reference": str(r["reference"]),
                "Pairs": int(r["pairs"]),
                f"Δ {label(r['metric'])}".replace(f" ({unit})", "")
                + (" (points)" if unit == "%" else ""): num(r["mean_diff"], "+.2f"),
                "95% CI": "–"
                if pd.isna(r["ci_low"])
                else f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]",
                "p (Holm)": num(r["p_holm"], ".3g"),
            }
        )
    return pd.DataFrame(rows)


def write(
    study: optuna.Study,
    out: Path,
    *,
    formats: list[str] | None = None,
    metrics: list[str] | None = None,
    select_by: str | None = None,
    over: list[str] | None = None,
) -> dict[str, Path]:
    """Write the export files atomically: all are made in a staging folder, then renamed in."""
    formats = list(formats or FORMATS)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(
            f"--format {','.join(bad)}: not one of the valid values: {', '.join(FORMATS)}"
        )
    t = build(study, metrics=metrics, select_by=select_by, over=over)
    summary = t.summary
    shown, best = display_table(summary, t.metrics, t.sweep.swept)
    paper = "paper test/error" in summary
    text = caption(study.study_name, t.trials, t.sweep, select_by, t.over, paper)
    eff = effects_table(t.effects)
    eff_caption = (
        f"{study.study_name}: each level against the reference, paired over the "
        "other swept settings and seeds; mean difference, its 95% interval (Student's t "
        f"below {EF.BOOTSTRAP_MIN_PAIRS} pairs, else bootstrap), paired t-test p-value, "
        "Holm-corrected across the table."
    )
    out.mkdir(parents=True, exist_ok=True)
    _remove_dead_stages(out)
    stage = Path(tempfile.mkdtemp(prefix=f".export-{os.getpid()}-", dir=out))
    written: dict[str, Path] = {}
    try:
        if "csv" in formats:
            t.trials.to_csv(stage / "trials.csv", index=False, lineterminator="\n")
            summary.rename(columns=_with_units).to_csv(
                stage / "summary.csv", index=False, lineterminator="\n"
            )
            t.effects.to_csv(stage / "effects.csv", index=False, lineterminator="\n")
            if t.selection is not None:
                t.selection.rename(columns=_with_units).to_csv(
                    stage / "selection.csv", index=False, lineterminator="\n"
                )
        if "md" in formats:
            (stage / "summary.md").write_text(to_markdown(shown, best, [text, *t.notes]))
            (stage / "effects.md").write_text(to_markdown(eff))
        if "tex" in formats:
            (stage / "summary.tex").write_text(
                to_latex(shown, text, f"tab:{study.study_name}-summary", best)
            )
            (stage / "effects.tex").write_text(
                to_latex(eff, eff_caption, f"tab:{study.study_name}-effects")
            )
        images = [f for f in ("png", "pdf") if f in formats]
        if images:
            metric = "test/error" if "test/error" in t.metrics else t.metrics[-1]
            figure(
                summary, t.trials, t.sweep, metric, t.over, [stage / f"summary.{f}" for f in images]
            )
            if len(t.effects):
                forest(t.effects, [stage / f"effects.{f}" for f in images])
        for path in sorted(stage.iterdir()):
            os.replace(path, out / path.name)  # each file swaps in whole, or not at all
            written[path.name] = out / path.name
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return written


def _with_units(col: str) -> str:
    for m, unit in UNITS.items():
        if col == m or col.startswith(f"{m} "):
            return f"{col} ({unit})"
    return col


def final_sweep(
    study: optuna.Study, path: Path, *, select_by: str, over: list[str], seeds: int = 3
) -> dict[str, Any]:
    """A sweep file that retrains each selected cell on every training image
    (`data.val_size=0`) with `seeds` seeds; `ablate sweep` runs it, `ablate export` reads it."""
    t = build(study, select_by=select_by, over=over)
    keys = cell_keys(t.sweep, over)
    chosen = t.summary[t.summary["n"] > 0]
    if chosen.empty:
        raise ExportError(f"--final-sweep: no cell has an eligible {', '.join(over)}")
    cells = [{k: _plain(row[k]) for k in keys + over} for _, row in chosen.iterrows()]
    base = {k: v for k, v in t.sweep.base.items() if k not in ("data.val_size", "seed")}
    raw = {
        "name": f"{study.study_name}-final",
        "description": f"{study.study_name}'s cells with {', '.join(over)} chosen by "
        f"{select_by}, retrained on every training image with {seeds} seeds",
        "method": "grid",
        # no validation split is left to select on; the metric only labels the study
        "metric": {"name": "train/loss", "goal": "minimize"},
        **({"project": t.sweep.project} if t.sweep.project else {}),
        "parameters": {
            **{k: {"value": _plain(v)} for k, v in base.items()},
            "data.val_size": {"value": 0},
            "seed": {"values": list(range(seeds))},
        },
        "selection": {
            "study": study.study_name,
            "by": select_by,
            "over": {k: [_plain(v) for v in t.sweep.params[k].values or ()] for k in over},
            "cells": cells,
        },
    }
    SF.parse(yaml.safe_load(yaml.safe_dump(raw)), str(path))  # what we write must load
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        f"# written by: ablate export {study.study_name} --select-by {select_by} "
        f"--over {' '.join(over)} --final-sweep {path}\n" + yaml.safe_dump(raw, sort_keys=False)
    )
    os.replace(tmp, path)
    return raw


def _plain(v: Any) -> Any:
    """numpy and pandas scalars as plain Python, for YAML."""
    return v.item() if hasattr(v, "item") else v


def _remove_dead_stages(out: Path) -> None:
    """Staging folders left by an export that was killed mid-write (its pid is gone)."""
    for stage in out.glob(".export-*"):
        pid = stage.name.split("-")[1]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stage, ignore_errors=True)


def check_out(out: Path) -> None:
    """--out must be a folder or a path that can become one: not a file, nor under one."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == out else f"is under {p}, which is a file"
            raise ExportError(f"--out {out}: {where}; give a folder")


def log_to_wandb(study: optuna.Study, sweep: SF.Sweep, mode: str, runs_dir: Path) -> None:
    """The sweep's exports in runs/<study>/export, and its `ablation-table` W&B run:
    summary, effects and trials as W&B tables, and the figures, each under its own key."""
    from ablations import wandb_log

    files = write(study, runs_dir / "export", formats=list(FORMATS))  # with W&B off too
    if mode == "disabled":
        return
    tables = {name: pd.read_csv(files[f"{name}.csv"]) for name in ("summary", "effects", "trials")}
    images = {
        f"{name}_figure": files[f"{name}.png"]
        for name in ("summary", "effects")
        if f"{name}.png" in files
    }
    wandb_log.log_table(
        mode,
        study=study.study_name,
        project=sweep.project,
        entity=sweep.entity,
        save_dir=runs_dir,
        tables=tables,
        images=images,
    )


def cmd_export(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"--format {args.format!r}: give one or more of: {', '.join(FORMATS)}")
    if args.final_sweep and not args.select_by:
        raise ExportError(
            "--final-sweep needs --select-by METRIC --over KEY: it retrains the selected settings"
        )
    if args.final_seeds < 1:
        raise ExportError(f"--final-seeds {args.final_seeds}: must be at least 1")
    study, _ = resolve_study(args.study, args.storage, runs_dir)
    out = Path(args.out) if args.out else runs_dir / study.study_name / "export"
    check_out(out)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    written = write(
        study, out, formats=formats, metrics=metrics, select_by=args.select_by, over=args.over
    )
    for path in written.values():
        print(path)
    if args.final_sweep:
        raw = final_sweep(
            study,
            Path(args.final_sweep),
            select_by=args.select_by,
            over=args.over,
            seeds=args.final_seeds,
        )
        print(
            f"{args.final_sweep}: {len(raw['selection']['cells'])} selected cells x "
            f"{args.final_seeds} seeds on every training image; run it with "
            f"ablate sweep {args.final_sweep}"
        )
    if "summary.md" in written:
        print()
        print(written["summary.md"].read_text(), end="")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="trials.csv, summary tables (CSV, Markdown, LaTeX), figure",
        description="Read the study (never W&B) and write the ablation exports "
        "under runs/<study>/export/ (or --out), atomically.",
    )
    p.add_argument("study", nargs="?", help="study name (optional if there is only one)")
    ST.add_storage_flag(p)
    p.add_argument("--out", help="output folder (default runs/<study>/export)")
    p.add_argument(
        "--format", default=",".join(FORMATS), help=f"comma-separated, from {','.join(FORMATS)}"
    )
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated metrics to summarise (default {','.join(DEFAULT_METRICS)})",
    )
    p.add_argument(
        "--select-by",
        default=None,
        metavar="METRIC",
        help="pick, per cell, the --over setting with the best mean METRIC among "
        "those whose seeds all completed (validation metrics only)",
    )
    p.add_argument(
        "--over",
        nargs="+",
        default=[],
        metavar="KEY",
        help="swept keys to choose by --select-by (e.g. train.lr)",
    )
    p.add_argument(
        "--final-sweep",
        metavar="FILE",
        default=None,
        help="also write a sweep file that retrains the selected settings on every "
        "training image (data.val_size=0)",
    )
    p.add_argument(
        "--final-seeds",
        type=int,
        default=3,
        metavar="N",
        help="seeds per selected cell in --final-sweep (default 3)",
    )
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_export)
