"""The ablation dataframe (one row per trial, read from the study) and its paper exports."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from ablations import settings as S
from ablations import storage as ST
from ablations import sweep as SW
from ablations import sweep_file as SF

FORMATS = ("csv", "md", "tex", "png", "pdf")
DEFAULT_METRICS = ("val/error", "test/error")
RESULT_COLUMNS = ("params", "macs", "val/error", "test/error", "best_epoch", "epochs_run",
                  "fit_seconds", "images_per_second", "device", "wandb_run_id", "git_commit")
STATE_ORDER = {"complete": 0, "diverged": 1, "pruned": 2, "failed": 3, "running": 4}


class ExportError(ValueError):
    """Bad export input: the message names it and what is valid."""


# --- the dataframe ---------------------------------------------------------------------------


def _settings_of(t: optuna.trial.FrozenTrial, sweep: SF.Sweep) -> dict[str, Any]:
    stored = t.user_attrs.get("settings")
    if stored:
        return dict(stored)
    # failed before its settings were resolved: rebuild what we can from the file and params
    raw = {**S.defaults(), **sweep.base, **t.params}
    try:
        return S.flat_with_name(raw, S.model_spec(raw))
    except ValueError:
        return {**raw, "model.name": None}


def trials_frame(study: optuna.Study, sweep: SF.Sweep | None = None) -> pd.DataFrame:
    """Every trial of the study as one tidy row, failed, pruned and running ones included."""
    sweep = sweep or SW.stored_sweep(study)
    setting_keys = [k for k in S.SCHEMA if k != "seed"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.WAITING:
            continue
        s = _settings_of(t, sweep)
        row: dict[str, Any] = {"study": study.study_name, "trial": t.number,
                               "state": SW.trial_state(t), "model.name": s.get("model.name")}
        row.update({k: s.get(k) for k in setting_keys})
        row["seed"] = s.get("seed")
        row.update({k: t.user_attrs.get(k) for k in RESULT_COLUMNS})
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["datetime_complete"] = (t.datetime_complete.isoformat()
                                    if t.datetime_complete else None)
        row["error_message"] = t.user_attrs.get("error_message")
        rows.append(row)
    columns = ["study", "trial", "state", "model.name", *setting_keys, "seed",
               *RESULT_COLUMNS, "datetime_start", "datetime_complete", "error_message"]
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


def summarize(trials: pd.DataFrame, sweep: SF.Sweep, metrics: list[str],
              select_by: str | None = None, over: list[str] | None = None) -> pd.DataFrame:
    """One row per cell: n, n_failed, mean and sample std of each metric, params."""
    over = over or []
    keys = cell_keys(sweep, over)
    group_keys = keys + over
    rows = []
    grouped = trials.groupby(group_keys, sort=False, dropna=False) if group_keys else \
        [((), trials)]
    for values, g in grouped:
        values = values if isinstance(values, tuple) else (values,)
        done = g[g["state"] == "complete"]
        row = dict(zip(group_keys, values))
        first = (done if len(done) else g).iloc[0]
        row["model.name"] = first["model.name"]
        if "model.base" not in group_keys:
            row["model.base"] = first["model.base"]
        row["n"] = len(done)
        row["n_failed"] = int(g["state"].isin(["failed", "diverged"]).sum())
        if (g["state"] == "pruned").any():
            row["n_pruned"] = int((g["state"] == "pruned").sum())
        if (g["state"] == "running").any():
            row["n_running"] = int((g["state"] == "running").sum())
        for m in metrics:
            vals = pd.to_numeric(done[m], errors="coerce").dropna()
            row[f"{m} mean"] = vals.mean() if len(vals) else math.nan
            row[f"{m} std"] = vals.std(ddof=1) if len(vals) > 1 else math.nan
        row["params"] = first["params"]
        row["_first"] = first
        rows.append(row)
    summary = pd.DataFrame(rows)
    if select_by is not None and over:
        summary = _select(summary, keys, over, select_by, sweep)
    summary = _join_paper(summary)
    return summary.drop(columns=["_first"]).reset_index(drop=True)


def _select(summary: pd.DataFrame, keys: list[str], over: list[str], metric: str,
            sweep: SF.Sweep) -> pd.DataFrame:
    """Per cell, keep the `over` setting with the best mean `metric` (the paper's protocol)."""
    col = f"{metric} mean"
    maximize = sweep.goal == "maximize" and metric == sweep.metric
    picked = []
    groups = summary.groupby(keys, sort=False, dropna=False) if keys else [((), summary)]
    for _, g in groups:
        ok = g[g[col].notna()]
        if ok.empty:
            picked.append(g.iloc[[0]])
            continue
        best = ok[col].idxmax() if maximize else ok[col].idxmin()
        picked.append(summary.loc[[best]])
    out = pd.concat(picked)
    out.insert(len(keys) + len(over), "selected_by", metric)
    return out


def _join_paper(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 3's number beside each cell that is a paper model on the paper's setting."""
    paper = dict(zip(paper_table()["name"], paper_table()["test_error_pct"]))
    ref, diff = [], []
    for _, row in summary.iterrows():
        s = row["_first"]
        on_protocol = (s.get("data.dataset") == "cifar10" and s.get("data.augment") == "none"
                       and s.get("model.width") == 1.0 and s.get("model.norm") == "none"
                       and s.get("model.dropout") == "paper" and s.get("model.head") == "gap")
        value = paper.get(row["model.name"]) if on_protocol else None
        ref.append(value)
        mean = row.get("test/error mean")
        diff.append(mean - value if value is not None and mean is not None else None)
    summary["paper test/error"] = pd.array(ref, dtype="Float64")
    summary["Δ test/error"] = pd.array(diff, dtype="Float64")
    if summary["paper test/error"].isna().all():
        summary = summary.drop(columns=["paper test/error", "Δ test/error"])
    return summary


# --- writers -------------------------------------------------------------------------------


def _fmt(mean: Any, std: Any) -> str:
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if std is not None and not pd.isna(std) else f"{mean:.2f}"


def display_table(summary: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The summary as people read it: `mean ± std` in one cell per metric."""
    out = summary.copy()
    for m in metrics:
        out[m] = [_fmt(a, b) for a, b in zip(summary[f"{m} mean"], summary[f"{m} std"])]
        out = out.drop(columns=[f"{m} mean", f"{m} std"])
    for col in ("paper test/error", "Δ test/error"):
        if col in out:
            out[col] = [("–" if pd.isna(v) else f"{v:+.2f}" if col.startswith("Δ")
                         else f"{v:.2f}") for v in out[col]]
    out["params"] = [f"{int(p):,}" if not pd.isna(p) else "–" for p in out["params"]]
    first = ["model.name"]
    return out[first + [c for c in out.columns if c not in first]]


def to_markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "/": r"/\allowbreak{}", "±": r"$\pm$",
                "Δ": r"$\Delta$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs table, ready to \\input (needs \\usepackage{booktabs})."""
    cols = list(table.columns)
    numeric = {c for c in cols if c in ("params", "n", "n_failed", "n_pruned", "n_running")}

    def cell(col: str, value: Any) -> str:
        text = str(value)
        if " ± " in text:
            a, b = text.split(" ± ")
            return f"${a} \\pm {b}$"
        if text == "–":
            return "--"
        return tex_escape(text)

    align = "".join("r" if c in numeric or c in ("val/error", "test/error") else "l"
                    for c in cols)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             f"\\caption{{{tex_escape(caption)}}}",
             f"\\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(tex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for _, r in table.iterrows():
        lines.append(" & ".join(cell(c, r[c]) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def figure(summary: pd.DataFrame, trials: pd.DataFrame, sweep: SF.Sweep, metric: str,
           paths: list[Path]) -> None:
    """Test error per cell with error bars over seeds, grouped by base, paper numbers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in summary.columns if k in sweep.swept and k != "seed"]
    label_keys = [k for k in keys if k not in ("model.base", "model.variant", "model.pooling",
                                               "model.strided_conv", "model.head")]
    bases = sorted(summary["_base"].unique())
    fig, ax = plt.subplots(figsize=(3.4, 2.6), dpi=200)
    x, ticks, labels = 0, [], []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for bi, base in enumerate(bases):
        part = summary[summary["_base"] == base]
        for _, row in part.iterrows():
            mean, std = row[f"{metric} mean"], row[f"{metric} std"]
            ax.bar(x, 0 if pd.isna(mean) else mean, yerr=None if pd.isna(std) else std,
                   color=colours[bi % len(colours)], capsize=2, width=0.8, alpha=0.85)
            paper = row.get("paper test/error")
            if paper is not None and not pd.isna(paper) and metric == "test/error":
                ax.plot(x, paper, marker="_", color="black", markersize=10, mew=1.5)
            extra = " ".join(f"{k.split('.')[-1]}={row[k]}" for k in label_keys)
            ticks.append(x)
            labels.append(f"{row['model.name']}" + (f"\n{extra}" if extra else ""))
            x += 1
        x += 0.6
    ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=5)
    ax.set_ylabel(f"{metric} (%)", fontsize=7)
    ax.tick_params(axis="y", labelsize=6)
    title = f"{sweep.name}: mean ± std over seeds"
    if "paper test/error" in summary and metric == "test/error":
        title += " (— paper)"
    ax.set_title(title, fontsize=7)
    ax.grid(axis="y", linewidth=0.3)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path)
    plt.close(fig)


# --- export --------------------------------------------------------------------------------


def resolve_study(name: str | None, url: str | None, runs_dir: Path) -> tuple[optuna.Study, str]:
    if url is None:
        journals = sorted(p.parent.name for p in runs_dir.glob("*/optuna.journal"))
        if name is None:
            if len(journals) != 1:
                raise ExportError("name the study to export; studies under "
                                  f"{runs_dir}: {', '.join(journals) or 'none'}")
            name = journals[0]
        url = ST.default_url(name, runs_dir)
        if not Path(url).exists():
            raise ExportError(f"unknown study {name!r}: studies under {runs_dir}: "
                              f"{', '.join(journals) or 'none'}")
    try:
        storage = ST.open_storage(url)
    except SF.SweepError as err:
        raise ExportError(str(err)) from None
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not names:
        raise ExportError(f"storage {ST.describe_url(url)} has no studies")
    if name is None:
        if len(names) != 1:
            raise ExportError(f"name the study to export; studies in {ST.describe_url(url)}: "
                              f"{', '.join(names)}")
        name = names[0]
    if name not in names:
        raise ExportError(f"unknown study {name!r}; studies in {ST.describe_url(url)}: "
                          f"{', '.join(names)}")
    return optuna.load_study(study_name=name, storage=storage), url


def build(study: optuna.Study, *, metrics: list[str] | None = None,
          select_by: str | None = None, over: list[str] | None = None
          ) -> tuple[pd.DataFrame, pd.DataFrame, SF.Sweep, list[str]]:
    """(trials, summary, sweep, metrics), with the export's input checks."""
    sweep = SW.stored_sweep(study)
    trials = trials_frame(study, sweep)
    metrics = list(metrics or DEFAULT_METRICS)
    over = list(over or [])
    available = [m for m in SF.METRICS if m in trials and trials[m].notna().any()]
    for m in metrics:
        if m not in trials.columns:
            raise ExportError(f"--metrics {m}: not a metric; valid: {', '.join(SF.METRICS)}")
    if select_by is not None:
        if select_by not in trials.columns or not trials[select_by].notna().any():
            raise ExportError(f"--select-by {select_by}: no trial has this metric; trials "
                              f"have: {', '.join(available) or 'none'}")
        if not over:
            raise ExportError("--select-by needs --over KEY (e.g. --over train.lr)")
        if select_by not in metrics:
            metrics.insert(0, select_by)
    for key in over:
        if key not in sweep.swept or key == "seed":
            raise ExportError(f"--over {key}: not a swept factor of {study.study_name}; "
                              f"swept: {', '.join(k for k in sweep.swept if k != 'seed')}")
    summary = summarize(trials, sweep, metrics, select_by, over)
    return trials, summary, sweep, metrics


def write(study: optuna.Study, out: Path, *, formats: list[str] | None = None,
          metrics: list[str] | None = None, select_by: str | None = None,
          over: list[str] | None = None) -> dict[str, Path]:
    """Write the export files atomically: all are made in a staging folder, then renamed in."""
    formats = list(formats or FORMATS)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(f"--format {','.join(bad)}: not one of the valid values: "
                          f"{', '.join(FORMATS)}")
    trials, summary, sweep, metrics = build(study, metrics=metrics, select_by=select_by,
                                            over=over)
    shown = display_table(summary, metrics)
    caption = (f"{study.study_name}: mean ± std over seeds"
               + (f"; {', '.join(over)} chosen per model by {select_by}" if select_by else ""))
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    written: dict[str, Path] = {}
    try:
        if "csv" in formats:
            trials.to_csv(stage / "trials.csv", index=False, lineterminator="\n")
            summary.to_csv(stage / "summary.csv", index=False, lineterminator="\n")
        if "md" in formats:
            (stage / "summary.md").write_text(to_markdown(shown))
        if "tex" in formats:
            (stage / "summary.tex").write_text(to_latex(shown, caption))
        images = [stage / f"summary.{f}" for f in ("png", "pdf") if f in formats]
        if images:
            plot = summary.assign(_base=summary["model.base"])
            metric = "test/error" if "test/error" in metrics else metrics[0]
            figure(plot, trials, sweep, metric, images)
        for path in sorted(stage.iterdir()):
            os.replace(path, out / path.name)  # each file swaps in whole, or not at all
            written[path.name] = out / path.name
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return written


def log_to_wandb(study: optuna.Study, sweep: SF.Sweep, mode: str, runs_dir: Path) -> None:
    """The sweep's `ablation-table` run: summary.csv as a wandb.Table, and the figure."""
    from ablations import wandb_log

    if mode == "disabled":
        return
    files = write(study, runs_dir / "export", formats=["csv", "md", "tex", "png", "pdf"])
    tables = {"summary": pd.read_csv(files["summary.csv"]),
              "trials": pd.read_csv(files["trials.csv"])}
    wandb_log.log_table(mode, study=study.study_name, project=sweep.project,
                        entity=sweep.entity, save_dir=runs_dir, tables=tables,
                        images={"summary": files["summary.png"]})


def cmd_export(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(f"--format {','.join(bad)}: not one of the valid values: "
                          f"{', '.join(FORMATS)}")
    study, _ = resolve_study(args.study, args.storage, runs_dir)
    out = Path(args.out) if args.out else runs_dir / study.study_name / "export"
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    written = write(study, out, formats=formats, metrics=metrics, select_by=args.select_by,
                    over=args.over)
    for path in written.values():
        print(path)
    if "summary.md" in written:
        print()
        print(written["summary.md"].read_text(), end="")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="trials.csv, summary tables (CSV, Markdown, LaTeX), figure",
                       description="Read the study (never W&B) and write the ablation exports "
                       "under runs/<study>/export/ (or --out), atomically.")
    p.add_argument("study", nargs="?", help="study name (optional if there is only one)")
    p.add_argument("--storage", help="Optuna storage URL (default runs/<study>/optuna.journal)")
    p.add_argument("--out", help="output folder (default runs/<study>/export)")
    p.add_argument("--format", default=",".join(FORMATS),
                   help=f"comma-separated, from {','.join(FORMATS)}")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated metrics to summarise (default "
                   f"{','.join(DEFAULT_METRICS)})")
    p.add_argument("--select-by", default=None, metavar="METRIC",
                   help="pick, per cell, the --over setting with the best mean METRIC")
    p.add_argument("--over", nargs="+", default=[], metavar="KEY",
                   help="swept keys to choose by --select-by (e.g. train.lr)")
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_export)
