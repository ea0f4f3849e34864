"""The report's figures as plotly specs (plain dicts, drawn by the page's plotly.js): the
summary's seeds and means, the effects' forest plot, learning curves per model, the swept
factors against the metric, and a random or bayes sweep's optimisation history."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ablations.effects import t_interval
from ablations.export.tables import UNITS, beside_name, label
from ablations.sweep_file import Sweep

COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12}
# the curves a figure draws, left to right
CURVE_PANELS = (("train/loss", "Training loss"), ("val/error", "Validation error (%)"))


def layout(**extra: Any) -> dict[str, Any]:
    base = {
        "font": FONT,
        "margin": {"l": 60, "r": 20, "t": 30, "b": 50},
        "hovermode": "closest",
        "plot_bgcolor": "white",
        "legend": {"orientation": "h", "y": -0.2},
    }
    return {**base, **extra}


def axis(title: str, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title},
        "gridcolor": "#e5e5e5",
        "zeroline": False,
        "linecolor": "#888",
        **extra,
    }


def num(v: Any) -> float | None:
    """A JSON number (NaN and infinities as None: a gap in the line)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 6) if math.isfinite(f) else None


def matching(trials: pd.DataFrame, row: pd.Series, keys: list[str]) -> pd.Series:
    """The trials of a summary row: equal on every cell key the row has."""
    match = pd.Series(True, index=trials.index)
    for k in keys:
        if k in trials and k in row and not pd.isna(row[k]):
            match &= trials[k].map(repr) == repr(row[k])
    return match


def cell_label(row: pd.Series, keys: list[str]) -> str:
    extra = ", ".join(f"{label(k)}={row[k]}" for k in beside_name(keys) if k in row)
    return f"{row['model.name']}" + (f" ({extra})" if extra else "")


def summary_points(
    summary: pd.DataFrame, trials: pd.DataFrame, keys: list[str], metric: str
) -> dict[str, Any]:
    """Each summary row: its seeds as points, the mean and its 95% interval, the paper's
    number as a cross where it is comparable (the export's figure, interactive)."""
    data: list[dict[str, Any]] = []
    seeds_x, seeds_y, seeds_text = [], [], []
    mean_x, mean_y, err_plus, err_minus, mean_text = [], [], [], [], []
    paper_x, paper_y = [], []
    ticks, labels = [], []
    for x, (_, row) in enumerate(summary.iterrows()):
        done = trials[matching(trials, row, keys) & (trials["state"] == "complete")]
        vals = pd.to_numeric(done[metric], errors="coerce")
        ok = vals.notna()
        n = int(ok.sum())
        offsets = np.linspace(-0.25, -0.05, n) if n > 1 else np.full(n, -0.15)
        for off, (_, t), v in zip(offsets, done[ok].iterrows(), vals[ok]):
            seeds_x.append(round(x + float(off), 3))
            seeds_y.append(num(v))
            seeds_text.append(f"trial {t['trial']}, seed {t['seed']}: {v:.2f}")
        if n:
            mean = float(vals[ok].mean())
            low, high = t_interval(vals[ok].to_numpy(dtype=float))
            mean_x.append(x + 0.1)
            mean_y.append(num(mean))
            err_plus.append(num(high - mean) if not math.isnan(high) else 0)
            err_minus.append(num(mean - low) if not math.isnan(low) else 0)
            interval = "" if math.isnan(low) else f", 95% CI [{low:.2f}, {high:.2f}]"
            mean_text.append(f"{cell_label(row, keys)}: mean {mean:.2f} over {n}{interval}")
        paper = row.get("paper test/error")
        if metric == "test/error" and paper is not None and not pd.isna(paper):
            paper_x.append(x)
            paper_y.append(num(paper))
        ticks.append(x)
        labels.append(cell_label(row, keys))
    data.append(
        {
            "type": "scatter", "mode": "markers", "name": "seed", "x": seeds_x, "y": seeds_y,
            "text": seeds_text, "hoverinfo": "text",
            "marker": {"size": 7, "color": "rgba(31,119,180,0.55)"},
        }
    )  # fmt: skip
    data.append(
        {
            "type": "scatter", "mode": "markers", "name": "mean, 95% CI", "x": mean_x,
            "y": mean_y, "text": mean_text, "hoverinfo": "text",
            "error_y": {"type": "data", "symmetric": False, "array": err_plus,
                        "arrayminus": err_minus, "color": "#222", "thickness": 1.2},
            "marker": {"size": 9, "color": "#1f77b4", "line": {"color": "black", "width": 1}},
        }
    )  # fmt: skip
    if paper_x:
        data.append(
            {
                "type": "scatter", "mode": "markers", "name": "paper (Table 3)", "x": paper_x,
                "y": paper_y, "marker": {"symbol": "x", "size": 9, "color": "black"},
            }
        )  # fmt: skip
    return {
        "data": data,
        "layout": layout(
            xaxis=axis("", tickvals=ticks, ticktext=labels, range=[-0.6, len(ticks) - 0.4]),
            yaxis=axis(label(metric)),
            margin={"l": 60, "r": 20, "t": 20, "b": 110},
        ),
    }


def forest(effects: pd.DataFrame) -> dict[str, Any]:
    """Mean paired difference and its 95% interval per level; filled: Holm p < 0.05."""
    rows = effects.reset_index(drop=True).iloc[::-1]
    names = [
        f"{label(r['factor'])}: {r['level']} vs {r['reference']} (n={r['pairs']})"
        for _, r in rows.iterrows()
    ]
    sig = [not pd.isna(p) and p < 0.05 for p in rows["p_holm"]]
    text = [
        f"{n}<br>Δ {r['mean_diff']:+.2f}"
        + ("" if pd.isna(r["ci_low"]) else f", 95% CI [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]")
        + ("" if pd.isna(r["p_holm"]) else f", p (Holm) {r['p_holm']:.3g}")
        for n, (_, r) in zip(names, rows.iterrows())
    ]
    metric = rows["metric"].iloc[0] if len(rows) else "metric"
    unit = " (points)" if UNITS.get(metric) == "%" else ""
    return {
        "data": [
            {
                "type": "scatter", "mode": "markers", "x": [num(v) for v in rows["mean_diff"]],
                "y": names, "text": text, "hoverinfo": "text", "showlegend": False,
                "error_x": {
                    "type": "data", "symmetric": False, "color": "black", "thickness": 1.2,
                    "array": [num(h - m) if not pd.isna(h) else 0
                              for h, m in zip(rows["ci_high"], rows["mean_diff"])],
                    "arrayminus": [num(m - lo) if not pd.isna(lo) else 0
                                   for lo, m in zip(rows["ci_low"], rows["mean_diff"])],
                },
                "marker": {"size": 9, "color": ["black" if s else "white" for s in sig],
                           "line": {"color": "black", "width": 1.2}},
            }
        ],
        "layout": layout(
            xaxis=axis(f"Δ {label(metric).replace(' (%)', '')}{unit}, paired; filled: "
                       "Holm p < 0.05", zeroline=True, zerolinecolor="#999"),
            yaxis=axis("", automargin=True),
            margin={"l": 20, "r": 20, "t": 10, "b": 50},
        ),
    }  # fmt: skip


def _band(
    x: list[int], series: list[list[float | None]]
) -> tuple[list[float | None], list[float | None], list[float | None]]:
    """Per epoch: the mean over the series that have that epoch, and mean ± std (sample)."""
    mean, low, high = [], [], []
    for i in range(len(x)):
        vals = [s[i] for s in series if i < len(s) and s[i] is not None]
        if not vals:
            mean.append(None), low.append(None), high.append(None)
            continue
        m = float(np.mean(vals))
        sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        mean.append(num(m)), low.append(num(m - sd)), high.append(num(m + sd))
    return mean, low, high


def learning_curves(
    cells: list[tuple[str, pd.DataFrame]], histories: dict[int, list[dict[str, Any]]]
) -> dict[str, Any]:
    """One model's cells: training loss and validation error per epoch, each seed a thin line
    (dashed if it did not complete), the completed seeds' mean and its ± std band."""
    data: list[dict[str, Any]] = []
    last = max((len(rows) for rows in histories.values()), default=1)
    ticks = {"tick0": 1, "dtick": max(1, math.ceil(last / 10))}  # whole epochs
    panels = {key: i for i, (key, _) in enumerate(CURVE_PANELS)}
    empty = set(panels)
    for c, (name, trials) in enumerate(cells):
        colour = COLOURS[c % len(COLOURS)]
        for key, p in panels.items():
            axes = {"xaxis": f"x{p + 1}" if p else "x", "yaxis": f"y{p + 1}" if p else "y"}
            done: list[list[float | None]] = []
            epochs: list[int] = []
            for _, t in trials.iterrows():
                rows = histories.get(int(t["trial"]), [])
                xs = [int(r["epoch"]) + 1 for r in rows if key in r]
                ys = [num(r[key]) for r in rows if key in r]
                if not xs:
                    continue
                empty.discard(key)
                complete = t["state"] == "complete"
                data.append(
                    {
                        "type": "scatter", "mode": "lines", "x": xs, "y": ys, **axes,
                        "name": f"{name}, trial {t['trial']}", "legendgroup": name,
                        "showlegend": False, "hovertemplate":
                        f"{name}<br>trial {t['trial']}, seed {t['seed']} ({t['state']})"
                        "<br>epoch %{x}: %{y:.4g}<extra></extra>",
                        "line": {"color": colour, "width": 1,
                                 "dash": "solid" if complete else "dot"},
                        "opacity": 0.45,
                    }
                )  # fmt: skip
                if complete:
                    done.append(ys)
                    epochs = xs if len(xs) > len(epochs) else epochs
            if not done:
                continue
            mean, low, high = _band(epochs, done)
            if len(done) > 1:
                data.append(
                    {
                        "type": "scatter", "mode": "lines", **axes, "hoverinfo": "skip",
                        "x": epochs + epochs[::-1], "y": high + low[::-1], "fill": "toself",
                        "fillcolor": _alpha(colour, 0.15), "line": {"width": 0},
                        "legendgroup": name, "showlegend": False, "name": f"{name} ± std",
                    }
                )  # fmt: skip
            data.append(
                {
                    "type": "scatter", "mode": "lines", **axes, "x": epochs, "y": mean,
                    "name": f"{name} (mean of {len(done)})", "legendgroup": name,
                    "showlegend": p == 0, "line": {"color": colour, "width": 2.5},
                    "hovertemplate": f"{name}, mean of {len(done)}<br>epoch %{{x}}: "
                    "%{y:.4g}<extra></extra>",
                }
            )  # fmt: skip
    annotations = [
        {
            "text": f"{title}: not recorded" if key in empty else title,
            "xref": f"x{p + 1} domain" if p else "x domain",
            "yref": f"y{p + 1} domain" if p else "y domain",
            "x": 0.5, "y": 1.08, "showarrow": False, "font": {"size": 13},
        }
        for p, (key, title) in enumerate(CURVE_PANELS)
    ]  # fmt: skip
    return {
        "data": data,
        "layout": layout(
            xaxis=axis("epoch", domain=[0, 0.46], **ticks),
            yaxis=axis(""),
            xaxis2=axis("epoch", domain=[0.54, 1], anchor="y2", **ticks),
            yaxis2=axis("", anchor="x2"),
            annotations=annotations,
            margin={"l": 60, "r": 20, "t": 34, "b": 50},
            legend={"orientation": "h", "y": -0.25},
        ),
    }


def _alpha(hex_colour: str, a: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{a})"


def factor_slices(trials: pd.DataFrame, sweep: Sweep, metric: str) -> dict[str, Any] | None:
    """Every swept factor (seed aside) against the metric, one panel each, every completed
    trial a point coloured by model, each level's mean a bar: which choice moved the metric."""
    factors = [k for k in sweep.swept if k != "seed" and k in trials]
    done = trials[trials["state"] == "complete"].copy()
    done[metric] = pd.to_numeric(done[metric], errors="coerce")
    done = done[done[metric].notna()]
    if not factors or done.empty:
        return None
    models = list(pd.unique(done["model.name"]))
    colour = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(models)}
    data: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    n = len(factors)
    gap = 0.06 if n > 1 else 0
    width = (1 - gap * (n - 1)) / n
    for i, key in enumerate(factors):
        xa, ya = ("x", "y") if i == 0 else (f"x{i + 1}", f"y{i + 1}")
        param = sweep.params[key]
        categorical = param.values is not None or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in done[key].dropna()
        )
        order = [str(v) for v in param.values] if param.values is not None else None
        xs = done[key].map(str) if categorical else done[key].astype(float)
        for m in models:
            part = done["model.name"] == m
            data.append(
                {
                    "type": "scatter", "mode": "markers", "xaxis": xa, "yaxis": ya,
                    "x": [v if categorical else num(v) for v in xs[part]],
                    "y": [num(v) for v in done.loc[part, metric]],
                    "name": m, "legendgroup": m, "showlegend": i == 0,
                    "marker": {"color": colour[m], "size": 7, "opacity": 0.7},
                    "text": [f"trial {t['trial']}: {m}, {label(key)}={t[key]}, seed {t['seed']}"
                             for _, t in done[part].iterrows()],
                    "hovertemplate": "%{text}<br>" + label(metric) + " %{y:.4g}<extra></extra>",
                }
            )  # fmt: skip
        if categorical:
            means = done.groupby(xs, sort=False)[metric].mean()
            levels = [lv for lv in (order or list(means.index)) if lv in means.index]
            data.append(
                {
                    "type": "scatter", "mode": "markers", "xaxis": xa, "yaxis": ya,
                    "x": levels, "y": [num(means[lv]) for lv in levels], "name": "level mean",
                    "legendgroup": "mean", "showlegend": i == 0,
                    "marker": {"symbol": "line-ew-open", "size": 26, "color": "black",
                               "line": {"width": 2.5}},
                    "hovertemplate": f"{label(key)}=%{{x}}: mean %{{y:.4g}}<extra></extra>",
                }
            )  # fmt: skip
        x0 = i * (width + gap)
        spec = {"domain": [x0, x0 + width], "anchor": ya}
        if categorical:
            spec.update(type="category", categoryorder="array", categoryarray=order or [])
        elif param.log:
            spec["type"] = "log"
        extra["xaxis" if i == 0 else f"xaxis{i + 1}"] = axis(label(key), **spec)
        shared = {"matches": "y"} if i else {}  # one scale across the panels
        extra["yaxis" if i == 0 else f"yaxis{i + 1}"] = axis(
            label(metric) if i == 0 else "", anchor=xa, **shared
        )
    return {"data": data, "layout": layout(**extra, margin={"l": 60, "r": 20, "t": 20, "b": 60})}


def optimisation_history(trials: pd.DataFrame, sweep: Sweep) -> dict[str, Any] | None:
    """A random or bayes sweep: each completed trial's metric by trial number, and the best
    so far."""
    metric = sweep.metric
    done = trials[trials["state"] == "complete"].sort_values("trial")
    vals = pd.to_numeric(done[metric], errors="coerce") if metric in done else pd.Series()
    done, vals = done[vals.notna()], vals[vals.notna()]
    if done.empty:
        return None
    best = vals.cummin() if sweep.goal == "minimize" else vals.cummax()
    text = [
        f"trial {t['trial']}: {t['model.name']}, "
        + ", ".join(f"{label(k)}={t[k]}" for k in sweep.swept if k in t)
        for _, t in done.iterrows()
    ]
    return {
        "data": [
            {
                "type": "scatter", "mode": "markers", "name": "trial",
                "x": [int(v) for v in done["trial"]], "y": [num(v) for v in vals],
                "text": text, "hovertemplate": "%{text}<br>%{y:.4g}<extra></extra>",
                "marker": {"size": 7, "color": "rgba(31,119,180,0.7)"},
            },
            {
                "type": "scatter", "mode": "lines", "name": "best so far", "line": {"shape": "hv",
                "color": "#d62728", "width": 2}, "x": [int(v) for v in done["trial"]],
                "y": [num(v) for v in best], "hoverinfo": "skip",
            },
        ],
        "layout": layout(xaxis=axis("trial"), yaxis=axis(label(metric))),
    }  # fmt: skip


def pareto(summary: pd.DataFrame, metric: str, name) -> dict[str, Any] | None:
    """The metric's seed mean (± std) against MACs, each row named, the front drawn."""
    rows = summary[summary[f"{metric} mean"].notna() & summary["macs"].notna()]
    if rows.empty:
        return None
    on = rows["pareto macs"].astype(bool) if "pareto macs" in rows else pd.Series(False, rows.index)
    data = []
    middle = (float(rows["macs"].min()) + float(rows["macs"].max())) / 2
    for flag, title, colour in ((False, "dominated", "#999"), (True, "Pareto-optimal", "#000")):
        part = rows[on == flag]
        if part.empty:
            continue
        data.append(
            {
                "type": "scatter", "mode": "markers+text", "name": title,
                "x": [num(v) for v in part["macs"]], "y": [num(v) for v in part[f"{metric} mean"]],
                "text": [name(r) for _, r in part.iterrows()],
                "textposition": ["top left" if v > middle else "top right" for v in part["macs"]],
                "textfont": {"size": 11},
                "error_y": {"type": "data", "array": [num(v) or 0 for v in part[f"{metric} std"]],
                            "color": colour, "thickness": 1},
                "marker": {"size": 9, "color": colour if flag else "white",
                           "line": {"color": colour, "width": 1.5}},
                "hovertemplate": "%{text}<br>MACs %{x:,}<br>" + label(metric)
                + " %{y:.2f}<extra></extra>",
            }
        )  # fmt: skip
    best = rows[on].sort_values("macs")
    if len(best) > 1:
        data.append(
            {
                "type": "scatter", "mode": "lines", "name": "front", "hoverinfo": "skip",
                "x": [num(v) for v in best["macs"]], "y": [num(v) for v in best[f"{metric} mean"]],
                "line": {"shape": "hv", "dash": "dash", "color": "#000", "width": 1},
            }
        )  # fmt: skip
    macs = rows["macs"].astype(float)
    log = bool(macs.min() > 0 and macs.max() / macs.min() > 20)
    return {
        "data": data,
        "layout": layout(
            xaxis=axis("MACs per image", type="log" if log else "linear"),
            yaxis=axis(label(metric)),
        ),
    }
