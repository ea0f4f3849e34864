"""`ablate status`: a study's totals and its cells (or trials) by state, read from storage.

Imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ablations import study as SD


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    study, sweep = SD.find(args.study, args.storage, Path(args.runs_dir))
    tot = SD.totals(study, sweep)
    console = Console(width=160)
    console.print(
        f"{study.study_name}: {tot['done']} done, {tot['running']} running, "
        f"{tot['failed']} failed trials, {tot['left']} left "
        f"(of {tot['cells']} {'cells' if sweep.method == 'grid' else 'trials'})"
    )
    table = Table()
    trials = study.get_trials(deepcopy=False)
    if sweep.method == "grid":
        for col in (*sweep.swept, "state", "trials", "val/error", "test/error"):
            table.add_column(col)
        for entry in SD.cell_states(sweep, trials).values():
            done = [t for t in entry["trials"] if SD.trial_state(t) in SD.DONE_STATES]
            last = done[0] if done else (entry["trials"][-1] if entry["trials"] else None)
            ua = last.user_attrs if last else {}
            table.add_row(
                *(str(entry["cell"][k]) for k in sweep.swept),
                entry["state"],
                ",".join(str(t.number) for t in entry["trials"]),
                _fmt(ua.get("val/error")),
                _fmt(ua.get("test/error")),
            )
    else:
        for col in ("trial", "state", *sweep.swept, "val/error", "test/error"):
            table.add_column(col)
        for t in trials:
            table.add_row(
                str(t.number),
                SD.trial_state(t),
                *(str(t.params.get(k, "")) for k in sweep.swept),
                _fmt(t.user_attrs.get("val/error")),
                _fmt(t.user_attrs.get("test/error")),
            )
    console.print(table)
    return 0


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.2f}"


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a study's totals and its cells by state")
    p.add_argument("study", nargs="?")
    p.add_argument("--storage")
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_status)
