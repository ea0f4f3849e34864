"""`ablate report`: its flags, its input checks and what it prints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ablations import process
from ablations.export.cli import find_study, summary_flags
from ablations.export.frame import ExportError

NAME = "report.html"


def check_out(out: Path) -> Path:
    """--out names the file (an existing folder: report.html in it); never a path under a
    file."""
    if out.is_dir():
        return out / NAME
    for p in out.parents:
        if p.exists() and not p.is_dir():
            raise ExportError(f"--out {out}: is under {p}, which is a file; give a file path")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from ablations import report
    from ablations.export import build

    runs_dir = Path(args.runs_dir)
    study = find_study(args.study, args.storage, runs_dir)
    out = check_out(Path(args.out) if args.out else runs_dir / study.study_name / NAME)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    tables = build(study, metrics=metrics, select_by=args.select_by, over=args.over)
    command = ["ablate", *sys.argv[1:]] if Path(sys.argv[0]).name == "ablate" else None
    text = report.build(study, runs_dir=runs_dir / study.study_name, tables=tables, command=command)
    report.write(out, text)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB): open it in any browser, no server needed")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="the study as one self-contained HTML file",
        description="Read the study (never W&B) and write one HTML file that opens in any "
        "browser with no server and no network: summary and effects, learning curves, the "
        "swept factors, every trial, provenance.",
    )
    p.add_argument("study", nargs="?", help="study name (optional if there is only one)")
    process.storage_flag(p)
    p.add_argument("--out", help=f"the file to write (default runs/<study>/{NAME})")
    summary_flags(p)
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_report)
