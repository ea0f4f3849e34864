"""Sweep overhead: what `ablate sweep` costs beyond training, on a grid the size of a study.

    python -m benchmarks.sweep_overhead [--runs 1:disabled 2:disabled --subset 1024]

A 48-cell grid of short trials (the four C-family variants x 12 seeds, synthetic data, width
0.125, one epoch; 48 is the size of sweeps/paper_table3.yaml's grid per rate) runs as a user
runs it, `ablate sweep FILE --workers N --wandb MODE` in a subprocess, in a fresh folder.
`ablate export` (trials.csv) then gives each trial's fit_seconds and its start and end.

  first step         = from the command's start to the first training batch of any trial
                       (each trial's epochs.json stamps it): what a user waits before
                       anything trains (imports, the preflight, the study, a worker's start).
  overhead per trial = (workers x wall - sum of fits) / trials, in worker-seconds: everything
                       a worker spends that is not a fit (start-up, data, Trainer setup, the
                       test pass, W&B, the study's bookkeeping, the closing export), spread
                       over the 48 cells.
  in-trial overhead  = a trial's (end - start) - its fit: what each further cell costs.
No target here: the old "< 3 s per trial on a 4-cell grid" mostly measured one
`import lightning` per worker; these are the figures a study of many cells pays.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common

SEEDS = 12  # x 4 variants = 48 cells

GRID = """\
name: {name}
description: benchmarks/sweep_overhead.py, 48 short trials
method: grid
metric: {{name: val/error, goal: minimize}}
parameters:
  data.dataset: {{value: synthetic}}
  data.preprocess: {{value: standardize}}
  data.dir: {{value: {data_dir}}}
  data.subset: {{value: {subset}}}
  model.width: {{value: 0.125}}
  model.dropout: {{value: none}}
  train.epochs: {{value: 1}}
  train.batch_size: {{value: 128}}
  model.variant: {{values: [base, strided, convpool, all-cnn]}}
  seed: {{values: {seeds}}}
"""


def _seconds(start: str, end: str) -> float:
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


def one_sweep(root: Path, workers: int, wandb: str, subset: int) -> dict[str, Any]:
    name = f"overhead-w{workers}-{wandb}"
    folder = root / name
    folder.mkdir(parents=True)
    sweep_file = folder / "sweep.yaml"
    sweep_file.write_text(
        GRID.format(name=name, data_dir=root / "data", subset=subset, seeds=list(range(SEEDS)))
    )
    cmd = [
        sys.executable,
        "-m",
        "ablations.cli",
        "sweep",
        str(sweep_file),
        "--workers",
        str(workers),
        "--wandb",
        wandb,
        "--runs-dir",
        str(folder / "runs"),
    ]
    env = dict(os.environ, WANDB_SILENT="true")
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    # the trials' own timings, as a user gets them (not timed: the sweep is over)
    export = [
        sys.executable,
        "-m",
        "ablations.cli",
        "export",
        name,
        "--format",
        "csv",
        "--runs-dir",
        str(folder / "runs"),
        "--out",
        str(folder / "export"),
    ]
    subprocess.run(export, cwd=folder, env=env, capture_output=True, text=True, check=True)
    with open(folder / "export" / "trials.csv") as f:
        trials = [r for r in csv.DictReader(f) if r["state"] == "complete"]
    fits = [float(r["fit_seconds"]) for r in trials]
    spans = [_seconds(r["datetime_start"], r["datetime_complete"]) for r in trials]
    n = len(trials)
    per_trial = (workers * wall - sum(fits)) / n
    in_trial = [s - f for s, f in zip(spans, fits)]
    first = min(
        json.loads(p.read_text())["first_step_at"]
        for p in (folder / "runs" / name / "trials").glob("*/epochs.json")
    )
    return {
        "workers": workers,
        "wandb": wandb,
        "trials": n,
        "wall_seconds": round(wall, 2),
        "first_step_seconds": round(first - started, 2),
        "sum_fit_seconds": round(sum(fits), 2),
        "median_fit_seconds": round(common.median(fits), 2),
        "overhead_per_trial_seconds": round(per_trial, 2),
        "in_trial_overhead_seconds": round(common.median(in_trial), 2),
        "fixed_seconds_per_sweep": round(workers * wall - sum(spans), 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--runs",
        nargs="+",
        default=["1:disabled", "2:disabled"],
        help="sweeps to run, as WORKERS:WANDB_MODE",
    )
    p.add_argument("--subset", type=int, default=1024, help="training images per trial")
    args = p.parse_args(argv)
    return common.in_scratch(run_benchmark, args, "sweep")


def run_benchmark(args, root: Path) -> dict[str, Any]:
    runs = []
    for spec in args.runs:
        workers, _, wandb = spec.partition(":")
        r = one_sweep(root, int(workers), wandb or "disabled", args.subset)
        print(
            f"  {workers} worker(s), wandb {r['wandb']}: first step after "
            f"{r['first_step_seconds']} s, wall {r['wall_seconds']} s, fits "
            f"{r['sum_fit_seconds']} s, overhead {r['overhead_per_trial_seconds']} s "
            f"per trial ({r['in_trial_overhead_seconds']} s in-trial)"
        )
        runs.append(r)
    figures = {"runs": runs}
    used = {
        "grid": GRID.format(
            name="<name>", data_dir="<tmp>/data", subset=args.subset, seeds=list(range(SEEDS))
        ),
        "command": "python -m ablations.cli sweep FILE --workers N --wandb MODE",
        "cells": 4 * SEEDS,
    }
    path = common.write_result("sweep_overhead", figures, used, args.out)
    print(f"sweep overhead: wrote {path}")
    return figures


if __name__ == "__main__":
    main()
