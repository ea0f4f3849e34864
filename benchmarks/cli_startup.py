"""CLI start-up: how long the commands that only read a study take, against the imports
they cannot avoid.

    python -m benchmarks.cli_startup [--repeats 5]

Each command runs in a fresh interpreter, interleaved with the others, `--repeats` times:
`ablate --help`, `ablate status STUDY`, `ablate export STUDY --format csv` on a 12-trial
study made in a scratch folder, `ablate models --format csv` (may import torch), and the
floor, `python -c "import optuna, pandas"`. Wall seconds, median and spread. Neither
`--help`, `status` nor `export` may import torch or Lightning (tests/test_architecture.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "import optuna, pandas (floor)": [sys.executable, "-c", "import optuna, pandas"],
    "ablate --help": [sys.executable, "-m", "ablations.cli", "--help"],
    "ablate status": [sys.executable, "-m", "ablations.cli", "status", "paper"],
    "ablate export (csv)": [
        sys.executable,
        *("-m", "ablations.cli", "export", "paper", "--format", "csv", "--out", "export"),
    ],
    "ablate models (csv)": [sys.executable, "-m", "ablations.cli", "models", "--format", "csv"],
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    return common.in_scratch(run_benchmark, args, "cli")


def run_benchmark(args, root: Path) -> dict[str, Any]:
    from tests.test_export import make_study  # the export tests' 12-trial study

    make_study(root)
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - t0)
    figures = {name: common.spread(xs, 2) for name, xs in seconds.items()}
    floor = figures["import optuna, pandas (floor)"]["median"]
    figures["over_floor_seconds"] = {
        name: round(f["median"] - floor, 2) for name, f in figures.items() if "floor" not in name
    }
    for name, f in figures.items():
        print(f"  {name}: {f}")
    used = {"repeats": args.repeats, "study": "tests/test_export.py make_study (12 trials)"}
    path = common.write_result("cli_startup", figures, used, args.out)
    print(f"cli start-up: wrote {path}")
    return figures


if __name__ == "__main__":
    main()
