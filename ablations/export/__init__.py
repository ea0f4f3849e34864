"""`ablate export`: the study as a tidy dataframe and its paper exports, one job a module.

Data flows one way: `frame` (one row per trial record) -> `summary` (cells over seeds, the
selection, the paper's Table 3) -> `tables` (labels, Markdown, LaTeX) and `figures`; this
module builds them once (`build`), writes the files atomically (`write`) and hands the same
tables to W&B (`log_to_wandb`). `final_sweep` writes the retraining sweep of a selection;
`cli` is the command. Imports neither torch nor Lightning.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd

from ablations import effects
from ablations.export import pareto
from ablations.export.figures import figure, forest, pareto_figure
from ablations.export.frame import ExportError, trials_frame
from ablations.export.summary import summarize
from ablations.export.tables import (
    beside_name,
    caption,
    display_table,
    effects_caption,
    effects_table,
    label,
    to_latex,
    to_markdown,
    with_units,
)
from ablations.record import COLUMNS as RESULT_COLUMNS
from ablations.study import stored_sweep
from ablations.sweep_file import METRICS, Sweep

__all__ = ["ExportError", "RESULT_COLUMNS", "Tables", "build", "log_to_wandb", "trials_frame"]
__all__ += ["summarize", "write"]

FORMATS = ("csv", "md", "tex", "png", "pdf")
DEFAULT_METRICS = ("val/error", "test/error")


@dataclass
class Tables:
    """Everything an export writes, made from the study alone."""

    study: str
    trials: pd.DataFrame
    summary: pd.DataFrame
    selection: pd.DataFrame | None
    effects: pd.DataFrame
    sweep: Sweep
    metrics: list[str]
    notes: list[str]
    select_by: str | None = None
    over: list[str] = field(default_factory=list)

    def csv_tables(self) -> dict[str, pd.DataFrame]:
        """The CSV files' tables by name (also what W&B gets)."""
        out = {
            "trials": self.trials,
            "summary": self.summary.rename(columns=with_units),
            "effects": self.effects,
        }
        if self.selection is not None:
            out["selection"] = self.selection.rename(columns=with_units)
        return out


def build(
    study: optuna.Study,
    *,
    metrics: list[str] | None = None,
    select_by: str | None = None,
    over: list[str] | None = None,
) -> Tables:
    """The export's tables, with its input checks."""
    sweep = stored_sweep(study)
    trials = trials_frame(study, sweep)
    if trials.empty:
        raise ExportError(f"study {study.study_name} has no trials yet: nothing to export")
    metrics = list(metrics or DEFAULT_METRICS)
    over = list(over or [])
    available = [m for m in METRICS if m in trials and trials[m].notna().any()]
    for m in metrics:
        if m not in METRICS and m != "test/error_dropout":
            raise ExportError(f"--metrics {m}: not a metric; valid: {', '.join(METRICS)}")
    if select_by is not None:
        if select_by.startswith("test/"):
            raise ExportError(
                f"--select-by {select_by}: choosing settings on the test set "
                "leaks it into the result; select on val/error or val/loss"
            )
        if select_by not in METRICS:
            raise ExportError(
                f"--select-by {select_by}: not a metric; valid: "
                f"{', '.join(m for m in METRICS if not m.startswith('test/'))}"
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
    summary = pareto.mark(summary, metric)
    if sweep.multi:  # the study's own front of its objectives, trial by trial
        on = pareto.study_front(study)
        trials["pareto"] = [n in on for n in trials["trial"]]
    factors = {
        k: list(sweep.params[k].values)
        for k in sweep.swept
        if k != "seed" and sweep.params[k].values is not None
    }
    paired = effects.effects(trials, factors, metric, [k for k in sweep.swept])
    return Tables(
        study.study_name, trials, summary, selection, paired, sweep, metrics, notes, select_by, over
    )


def write(
    study: optuna.Study,
    out: Path,
    *,
    formats: list[str] | None = None,
    metrics: list[str] | None = None,
    select_by: str | None = None,
    over: list[str] | None = None,
    tables: Tables | None = None,
) -> dict[str, Path]:
    """Write the export files atomically: all are made in a staging folder, then renamed in.
    `tables`: what `build` made already (else it is built here from the other arguments)."""
    formats = list(formats or FORMATS)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(
            f"--format {','.join(bad)}: not one of the valid values: {', '.join(FORMATS)}"
        )
    t = tables or build(study, metrics=metrics, select_by=select_by, over=over)
    summary = t.summary
    shown, best = display_table(summary, t.metrics, t.sweep.swept)
    paper = "paper test/error" in summary
    text = caption(study.study_name, t.trials, t.sweep, t.select_by, t.over, paper)
    eff = effects_table(t.effects)
    eff_caption = effects_caption(study.study_name)
    out.mkdir(parents=True, exist_ok=True)
    _remove_dead_stages(out)
    stage = Path(tempfile.mkdtemp(prefix=f".export-{os.getpid()}-", dir=out))
    written: dict[str, Path] = {}
    try:
        if "csv" in formats:
            for name, table in t.csv_tables().items():
                table.to_csv(stage / f"{name}.csv", index=False, lineterminator="\n")
        metric = "test/error" if "test/error" in t.metrics else t.metrics[-1]
        if "md" in formats:
            (stage / "summary.md").write_text(to_markdown(shown, best, [text, *t.notes]))
            (stage / "effects.md").write_text(to_markdown(eff))
            front = pareto.table(summary, metric, row_label(t))
            (stage / "pareto.md").write_text(to_markdown(front, notes=[pareto_caption(t, metric)]))
        if "tex" in formats:
            (stage / "summary.tex").write_text(
                to_latex(shown, text, f"tab:{study.study_name}-summary", best)
            )
            (stage / "effects.tex").write_text(
                to_latex(eff, eff_caption, f"tab:{study.study_name}-effects")
            )
        images = [f for f in ("png", "pdf") if f in formats]
        if images:
            pareto_figure(summary, metric, row_label(t), [stage / f"pareto.{f}" for f in images])
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


def row_label(t: Tables):
    """A summary row's name in the Pareto table and figure: the model and its swept settings."""
    keys = beside_name([k for k in t.sweep.swept if k != "seed" and k in t.summary])
    if "precision" in t.summary:
        keys.append("precision")

    def name(row):
        if isinstance(row, str):
            return label(row)
        extra = ", ".join(f"{label(k)}={row[k]}" for k in keys)
        return f"{row['model.name']}" + (f" ({extra})" if extra else "")

    return name


def pareto_caption(t: Tables, metric: str) -> str:
    return (
        f"{t.study}: {label(metric)} (mean ± std over the completed seeds) against what each "
        "row costs; a row is Pareto-optimal against a cost when no other row has a lower or "
        "equal mean error and a lower or equal cost, one of them strictly lower. Params and "
        "MACs are the model's; training time is the mean fit time of the seeds, on the "
        "machines that ran them."
    )


def _remove_dead_stages(out: Path) -> None:
    """Staging folders left by an export that was killed mid-write (its process is gone)."""
    import psutil

    for stage in out.glob(".export-*"):
        pid = stage.name.split("-")[1]
        if not pid.isdigit() or not psutil.pid_exists(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def log_to_wandb(
    study: optuna.Study,
    sweep: Sweep,
    mode: str,
    runs_dir: Path,
    *,
    tables: Tables | None = None,
    files: dict[str, Path] | None = None,
    html: dict[str, Path] | None = None,
) -> None:
    """The study's `ablation-table` W&B run: the summary, effects and trials tables as W&B
    tables, the figures, and `html` pages (the report) shown and kept as artifacts.
    `tables`/`files`: what `build` and `write` made already (else the exports are written
    under runs/<study>/export here)."""
    from ablations import wandb_log

    tables = tables or build(study)
    if files is None:
        files = write(study, runs_dir / "export", formats=list(FORMATS), tables=tables)
    if mode == "disabled":
        return
    images = {
        f"{name}_figure": files[f"{name}.png"]
        for name in ("summary", "effects")
        if f"{name}.png" in files
    }
    csv = tables.csv_tables()
    wandb_log.log_table(
        mode,
        study=study.study_name,
        project=sweep.project,
        entity=sweep.entity,
        save_dir=runs_dir,
        tables={name: _for_wandb(csv[name]) for name in ("summary", "effects", "trials")},
        images=images,
        html=html,
    )


def _for_wandb(df: pd.DataFrame) -> pd.DataFrame:
    """A table as W&B types it, holding what the CSV holds: a column mixing numbers and
    strings (an effect's levels: `all-cnn`, `0.1`) as strings, nullable floats as floats."""
    out = df.copy()
    for col in out.columns:
        if isinstance(out[col].dtype, pd.Float64Dtype):
            out[col] = out[col].astype("float64")
        elif out[col].dtype == object:
            kinds = {_kind(v) for v in out[col].dropna()}
            if len(kinds) > 1:
                out[col] = [None if pd.isna(v) else str(v) for v in out[col]]
    return out


def _kind(v: object) -> str:
    if isinstance(v, bool):
        return "bool"
    return "number" if isinstance(v, int | float) else type(v).__name__
