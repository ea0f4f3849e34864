"""`ablate status`: a study's totals and its cells (or trials) by state, read from storage.

Imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ablations import process
from ablations.liveness import is_stale
from ablations.record import Outcome, TrialRecord
from ablations.storage import storage_of, study_id
from ablations.study import errors, find, study_cells, totals
from ablations.sweep_file import SweepError


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    study, sweep = find(args.study, args.storage, Path(args.runs_dir))
    tot = totals(study, sweep)
    console = Console(width=160)
    console.print(
        f"{study.study_name}: {tot.done} done, {tot.running} running, "
        f"{tot.failed} failed trials, {tot.left} left, {tot.given_up} given up "
        f"(of {tot.cells} {'cells' if sweep.method == 'grid' else 'trials'})"
    )
    if sweep.multi:
        said = ", ".join(f"{name} ({goal})" for name, goal in sweep.objectives)
        console.print(f"  objectives: {said}", markup=False, highlight=False)
    for message, n in sorted(errors(study).items(), key=lambda kv: -kv[1])[:5]:
        console.print(f"  failed: {n} x {message}", markup=False, highlight=False)
    table = Table()
    # every objective by name beside the errors (a multi-objective sweep's cost, say)
    shown = ["val/error", "test/error"]
    shown += [name for name, _ in sweep.objectives if name not in shown]
    if sweep.method == "grid":
        for col in (*sweep.swept, "state", "trials", *shown):
            table.add_column(col)
        for entry in study_cells(study, sweep).values():
            records = [TrialRecord.of(t) for t in entry.trials]
            done = [r for r in records if r.outcome.done]
            last = done[0] if done else (records[-1] if records else None)
            running = [t for t, r in zip(entry.trials, records) if r.outcome == Outcome.RUNNING]
            table.add_row(
                *(str(entry.cell[k]) for k in sweep.swept),
                _state(entry.state, running[-1] if running else None),
                ",".join(str(t.number) for t in entry.trials),
                *(_fmt(last and last.get(m)) for m in shown),
            )
    else:
        for col in ("trial", "state", *sweep.swept, *shown):
            table.add_column(col)
        for t in study.get_trials(deepcopy=False):
            record = TrialRecord.of(t)
            table.add_row(
                str(t.number),
                _state(record.outcome, t),
                *(str(t.params.get(k, "")) for k in sweep.swept),
                *(_fmt(record.get(m)) for m in shown),
            )
    console.print(table)
    return 0


def _state(state: str, trial: Any) -> str:
    """A running trial whose worker is gone says so (the next `ablate sweep` re-runs it)."""
    if state == Outcome.RUNNING and trial is not None:
        why = is_stale(trial)
        if why:
            return f"running, worker gone ({why})"
    return str(state)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return f"{v:,}" if isinstance(v, int) else f"{v:.2f}"


def cmd_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard on the study's storage, on this machine only (127.0.0.1)."""
    study, _ = find(args.study, args.storage, Path(args.runs_dir))
    if not 0 < args.port < 65536:
        raise SweepError(f"--port {args.port}: give a port between 1 and 65535")
    from optuna_dashboard import run_server

    url = f"http://127.0.0.1:{args.port}/dashboard/studies/{study_id(study)}"
    print(f"optuna-dashboard for {study.study_name}: {url} (Ctrl-C stops it)", flush=True)
    try:
        run_server(storage_of(study), host="127.0.0.1", port=args.port)
    except OSError as err:  # the port is taken, say
        raise SweepError(f"--port {args.port}: {err.strerror or err}") from None
    except KeyboardInterrupt:
        pass
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a study's totals and its cells by state")
    p.add_argument("study", nargs="?")
    process.storage_flag(p)
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "dashboard",
        help="optuna-dashboard on a study (learning curves, parameter importances)",
        description="Serve optuna-dashboard for the study on http://127.0.0.1:PORT.",
    )
    p.add_argument("study", nargs="?")
    process.storage_flag(p)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_dashboard)
