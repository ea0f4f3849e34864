"""`ablate status`: a study's totals and its cells (or trials) by state, read from storage.

Imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ablations import storage as ST
from ablations import study as SD
from ablations import sweep_file as SF


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    study, sweep = SD.find(args.study, args.storage, Path(args.runs_dir))
    tot = SD.totals(study, sweep)
    console = Console(width=160)
    console.print(
        f"{study.study_name}: {tot['done']} done, {tot['running']} running, "
        f"{tot['failed']} failed trials, {tot['left']} left, {tot['given_up']} given up "
        f"(of {tot['cells']} {'cells' if sweep.method == 'grid' else 'trials'})"
    )
    for message, n in sorted(SD.errors(study).items(), key=lambda kv: -kv[1])[:5]:
        console.print(f"  failed: {n} x {message}", markup=False, highlight=False)
    table = Table()
    trials = study.get_trials(deepcopy=False)
    if sweep.method == "grid":
        for col in (*sweep.swept, "state", "trials", "val/error", "test/error"):
            table.add_column(col)
        for entry in SD.cell_states(
            sweep, trials, SD.retry_from(study), SD.skipped(study)
        ).values():
            done = [t for t in entry["trials"] if SD.trial_state(t) in SD.DONE_STATES]
            last = done[0] if done else (entry["trials"][-1] if entry["trials"] else None)
            ua = last.user_attrs if last else {}
            running = [t for t in entry["trials"] if SD.trial_state(t) == "running"]
            table.add_row(
                *(str(entry["cell"][k]) for k in sweep.swept),
                _state(entry["state"], running[-1] if running else None),
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
                _state(SD.trial_state(t), t),
                *(str(t.params.get(k, "")) for k in sweep.swept),
                _fmt(t.user_attrs.get("val/error")),
                _fmt(t.user_attrs.get("test/error")),
            )
    console.print(table)
    return 0


def _state(state: str, trial: Any) -> str:
    """A running trial whose worker is gone says so (the next `ablate sweep` re-runs it)."""
    if state == "running" and trial is not None:
        why = ST.is_stale(trial)
        if why:
            return f"running, worker gone ({why})"
    return state


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.2f}"


def cmd_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard on the study's storage, on this machine only (127.0.0.1)."""
    study, _ = SD.find(args.study, args.storage, Path(args.runs_dir))
    if not 0 < args.port < 65536:
        raise SF.SweepError(f"--port {args.port}: give a port between 1 and 65535")
    from optuna_dashboard import run_server

    url = f"http://127.0.0.1:{args.port}/dashboard/studies/{ST.study_id(study)}"
    print(f"optuna-dashboard for {study.study_name}: {url} (Ctrl-C stops it)", flush=True)
    try:
        run_server(ST.storage_of(study), host="127.0.0.1", port=args.port)
    except OSError as err:  # the port is taken, say
        raise SF.SweepError(f"--port {args.port}: {err.strerror or err}") from None
    except KeyboardInterrupt:
        pass
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a study's totals and its cells by state")
    p.add_argument("study", nargs="?")
    ST.add_storage_flag(p)
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "dashboard",
        help="optuna-dashboard on a study (learning curves, parameter importances)",
        description="Serve optuna-dashboard for the study on http://127.0.0.1:PORT.",
    )
    p.add_argument("study", nargs="?")
    ST.add_storage_flag(p)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_dashboard)
