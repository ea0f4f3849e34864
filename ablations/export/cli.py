"""`ablate export`: its flags, its input checks and what it prints."""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna

from ablations import process
from ablations.export import DEFAULT_METRICS, FORMATS, build, write
from ablations.export.final_sweep import final_sweep
from ablations.export.frame import ExportError
from ablations.study import find
from ablations.sweep_file import SweepError


def find_study(name: str | None, url: str | None, runs_dir: Path) -> optuna.Study:
    """The study to export (study.find), its errors as export errors."""
    try:
        return find(name, url, runs_dir)[0]
    except SweepError as err:
        raise ExportError(str(err)) from None


def check_out(out: Path) -> None:
    """--out must be a folder or a path that can become one: not a file, nor under one."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == out else f"is under {p}, which is a file"
            raise ExportError(f"--out {out}: {where}; give a folder")


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
    study = find_study(args.study, args.storage, runs_dir)
    out = Path(args.out) if args.out else runs_dir / study.study_name / "export"
    check_out(out)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    tables = build(study, metrics=metrics, select_by=args.select_by, over=args.over)
    written = write(study, out, formats=formats, tables=tables)
    for path in written.values():
        print(path)
    if args.final_sweep:
        raw = final_sweep(tables, Path(args.final_sweep), seeds=args.final_seeds)
        print(
            f"{args.final_sweep}: {len(raw['selection']['cells'])} selected cells x "
            f"{args.final_seeds} seeds on every training image; run it with "
            f"ablate sweep {args.final_sweep}"
        )
    if "summary.md" in written:
        print()
        print(written["summary.md"].read_text(), end="")
    return 0


def summary_flags(p: argparse.ArgumentParser) -> None:
    """--metrics, --select-by, --over: what the summary holds (export and report alike)."""
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


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="trials.csv, summary tables (CSV, Markdown, LaTeX), figure",
        description="Read the study (never W&B) and write the ablation exports "
        "under runs/<study>/export/ (or --out), atomically.",
    )
    p.add_argument("study", nargs="?", help="study name (optional if there is only one)")
    process.storage_flag(p)
    p.add_argument("--out", help="output folder (default runs/<study>/export)")
    p.add_argument(
        "--format", default=",".join(FORMATS), help=f"comma-separated, from {','.join(FORMATS)}"
    )
    summary_flags(p)
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
