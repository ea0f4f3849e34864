"""The export's tables as people read them: labels with units, `mean ± std` cells, the best
mean in bold, Markdown and LaTeX (booktabs) writers and the captions."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ablations.effects import BOOTSTRAP_MIN_PAIRS
from ablations.export.summary import paper_table, seed_count
from ablations.sweep_file import Sweep

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


# the slot settings a Table 3 model's name says already (`All-CNN-C` is base C, all-cnn)
SLOTS = ("model.base", "model.variant", "model.pooling", "model.strided_conv")


def beside_name(keys: list[str]) -> list[str]:
    """The cell keys a row's label adds to its model name."""
    return [k for k in keys if k not in SLOTS]


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
        return list(SLOTS)
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
    # the costs and fronts have their own table (pareto.md); the paper's table stays as it was
    hidden = [*hidden, "macs", "fit_seconds mean", "fit_seconds std"]
    hidden += [c for c in summary.columns if c.startswith("pareto ")]
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
    sweep: Sweep,
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


def effects_caption(study: str) -> str:
    return (
        f"{study}: each level against the reference, paired over the "
        "other swept settings and seeds; mean difference, its 95% interval (Student's t "
        f"below {BOOTSTRAP_MIN_PAIRS} pairs, else bootstrap), paired t-test p-value, "
        "Holm-corrected across the table."
    )


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


def with_units(col: str) -> str:
    for m, unit in UNITS.items():
        if col == m or col.startswith(f"{m} "):
            return f"{col} ({unit})"
    return col
