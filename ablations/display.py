"""The live table of `ablate sweep`: totals, ETA and one line per worker, drawn from the
study and the workers' status files (process.WorkerStatus); one line per change when the
output is not a terminal."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import optuna

from ablations.process import WorkerStatus
from ablations.study import Totals, totals
from ablations.sweep_file import Sweep


def _worker_lines(status_dir: Path, n: int) -> list[dict[str, Any]]:
    return [WorkerStatus.read(status_dir / f"worker-{i}.json", i) for i in range(n)]


def _render(study_name: str, tot: Totals, lines: list[dict], eta: str):
    from rich.table import Table

    table = Table(
        title=f"{study_name}: {tot.done} done / {tot.running} running / "
        f"{tot.failed} failed / {tot.left} left   ETA {eta}",
        title_justify="left",
    )
    for col in ("worker", "state", "trial", "cell", "epoch", "val/error"):
        table.add_column(col)
    for w in lines:
        epoch = f"{w.get('epoch', '')}/{w.get('epochs', '')}" if w.get("epochs") else ""
        table.add_row(
            str(w.get("worker")),
            str(w.get("state", "")),
            str(w.get("trial", "")),
            str(w.get("cell") or ""),
            epoch,
            str(w.get("val_error") or ""),
        )
    return table


def live(procs: list[subprocess.Popen]) -> bool:
    """Whether any worker still runs; polls (and so reaps) every one of them. A zombie left
    unreaped keeps its /proc entry, and the stale-trial check then took its dead worker for
    a live one: the survivors waited for its trial forever."""
    return [p.poll() for p in procs].count(None) > 0


def watch(study: optuna.Study, sweep: Sweep, procs: list, status_dir: Path, t0: float) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    start_done: int | None = None

    def snapshot() -> tuple[Totals | None, str]:
        nonlocal start_done
        try:
            tot = totals(study, sweep)
        except Exception:  # storage blip or loss: the workers report it; keep reaping them
            return None, "?"
        if start_done is None:
            start_done = tot.done
        finished = tot.done - start_done
        elapsed = time.time() - t0
        eta = "?"
        if finished > 0 and tot.unfinished > 0:
            # trials finish at `finished / elapsed` a second; running ones are half done
            secs = (tot.left + tot.running / 2) * elapsed / finished
            eta = time.strftime("%H:%M:%S", time.gmtime(secs))
        elif tot.unfinished == 0:
            eta = "0"
        return tot, eta

    if console.is_terminal:
        with Live(console=console, refresh_per_second=2) as screen:
            while True:
                running = live(procs)
                tot, eta = snapshot()
                if tot is not None:
                    lines = _worker_lines(status_dir, len(procs))
                    screen.update(_render(study.study_name, tot, lines, eta))
                if not running:
                    return
                time.sleep(1)
    # not a terminal (CI, a log file): one line whenever the totals change
    last = None
    while live(procs):
        tot, eta = snapshot()
        if tot != last:  # the totals, not the ETA, which moves every poll
            if tot is None:
                print(f"{study.study_name}: storage unreachable; waiting for the workers")
            else:
                print(
                    f"{study.study_name}: done {tot.done} running {tot.running} "
                    f"failed {tot.failed} left {tot.left} ETA {eta}",
                    flush=True,
                )
            last = tot
        time.sleep(2)
