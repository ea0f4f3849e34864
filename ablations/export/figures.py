"""The export's figures, one column of a two-column paper wide: every seed as a point with
the mean and its 95% interval per cell, and the forest plot of the paired effects."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ablations.effects import t_interval
from ablations.export.summary import cell_keys
from ablations.export.tables import UNITS, beside_name, label
from ablations.sweep_file import Sweep

WIDTH_IN = 3.3  # one column of a two-column paper


def pyplot():
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


def figure(
    summary: pd.DataFrame,
    trials: pd.DataFrame,
    sweep: Sweep,
    metric: str,
    over: list[str],
    paths: list[Path],
) -> None:
    """Every seed as a point, the mean and its 95% interval, models grouped by base with
    their variants side by side, the paper's number as a cross where it is comparable."""
    plt = pyplot()
    keys = [k for k in cell_keys(sweep, []) if k in summary]
    label_keys = beside_name(keys)
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
    plt = pyplot()
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


def pareto_figure(summary: pd.DataFrame, metric: str, name, paths: list[Path]) -> None:
    """The metric's seed mean (± std) against MACs, each row named, the front drawn through
    the Pareto-optimal rows: which ablation buys accuracy and what it costs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 2.4), layout="constrained")
    rows = summary[summary[f"{metric} mean"].notna() & summary["macs"].notna()]
    x = rows["macs"].astype(float).to_numpy()
    y = rows[f"{metric} mean"].astype(float).to_numpy()
    sd = rows[f"{metric} std"].astype(float).fillna(0).to_numpy()
    on = rows["pareto macs"].to_numpy(dtype=bool) if "pareto macs" in rows else np.zeros(len(x))
    ax.errorbar(x[~on], y[~on], yerr=sd[~on], fmt="o", ms=3, color="grey", mfc="white",
                elinewidth=0.6, capsize=1.5, label="dominated")  # fmt: skip
    ax.errorbar(x[on], y[on], yerr=sd[on], fmt="o", ms=3, color="black", elinewidth=0.6,
                capsize=1.5, label="Pareto-optimal")  # fmt: skip
    order = np.argsort(x[on])
    ax.step(x[on][order], y[on][order], where="post", color="black", lw=0.7, ls="--")
    for xi, yi, (_, r) in zip(x, y, rows.iterrows()):
        ax.annotate(name(r), (xi, yi), xytext=(3, 3), textcoords="offset points", fontsize=4.5)
    if len(x) and x.min() > 0 and x.max() / x.min() > 20:
        ax.set_xscale("log")
    ax.set_xlabel("MACs per image")
    ax.set_ylabel(label(metric))
    ax.grid(linewidth=0.3, alpha=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(loc="best", frameon=False, handlelength=1)
    for path in paths:
        fig.savefig(path, dpi=300)
    plt.close(fig)
