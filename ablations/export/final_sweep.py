"""`ablate export --final-sweep`: a sweep file that retrains each selected cell on every
training image, with its selection recorded so the export of that sweep can say how."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ablations.export import Tables
from ablations.export.frame import ExportError
from ablations.export.summary import cell_keys
from ablations.files import atomic_write
from ablations.sweep_file import parse


def final_sweep(t: Tables, path: Path, *, seeds: int = 3) -> dict[str, Any]:
    """A sweep file that retrains each cell `t` selected on every training image
    (`data.val_size=0`) with `seeds` seeds; `ablate sweep` runs it, `ablate export` reads it."""
    name, select_by, over = t.study, t.select_by, t.over
    keys = cell_keys(t.sweep, over)
    chosen = t.summary[t.summary["n"] > 0]
    if chosen.empty:
        raise ExportError(f"--final-sweep: no cell has an eligible {', '.join(over)}")
    cells = [{k: _plain(row[k]) for k in keys + over} for _, row in chosen.iterrows()]
    base = {k: v for k, v in t.sweep.base.items() if k not in ("data.val_size", "seed")}
    raw = {
        "name": f"{name}-final",
        "description": f"{name}'s cells with {', '.join(over)} chosen by "
        f"{select_by}, retrained on every training image with {seeds} seeds",
        "method": "grid",
        # no validation split is left to select on; the metric only labels the study
        "metric": {"name": "train/loss", "goal": "minimize"},
        **({"project": t.sweep.project} if t.sweep.project else {}),
        "parameters": {
            **{k: {"value": _plain(v)} for k, v in base.items()},
            "data.val_size": {"value": 0},
            "seed": {"values": list(range(seeds))},
        },
        "selection": {
            "study": name,
            "by": select_by,
            "over": {k: [_plain(v) for v in t.sweep.params[k].values or ()] for k in over},
            "cells": cells,
        },
    }
    parse(yaml.safe_load(yaml.safe_dump(raw)), str(path))  # what we write must load
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path,
        f"# written by: ablate export {name} --select-by {select_by} "
        f"--over {' '.join(over)} --final-sweep {path}\n" + yaml.safe_dump(raw, sort_keys=False),
    )
    return raw


def _plain(v: Any) -> Any:
    """numpy and pandas scalars as plain Python, for YAML."""
    return v.item() if hasattr(v, "item") else v
