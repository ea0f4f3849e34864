"""The study as a tidy dataframe: one row per trial (failed, pruned and running ones
included), read from each trial's record, ordered by the sweep's factors."""

from __future__ import annotations

from typing import Any

import optuna
import pandas as pd

from ablations.record import COLUMNS, Outcome, TrialRecord
from ablations.settings import SCHEMA, defaults, recorded, resolve
from ablations.study import stored_sweep
from ablations.sweep_file import Sweep


class ExportError(ValueError):
    """Bad export input: the message names it and what is valid."""


STATE_ORDER = {
    "complete": 0,
    "diverged": 1,
    "pruned": 2,
    "failed": 3,
    "interrupted": 4,
    "running": 5,
}


def _settings_of(record: TrialRecord, t: optuna.trial.FrozenTrial, sweep: Sweep) -> dict[str, Any]:
    if record.settings:
        return dict(record.settings)
    # failed before its settings were resolved: rebuild what we can from the file and params
    try:
        return recorded(resolve({**sweep.base, **t.params}))
    except ValueError:
        return {**defaults(), **sweep.base, **t.params, "model.name": None}


def trials_frame(study: optuna.Study, sweep: Sweep | None = None) -> pd.DataFrame:
    """Every trial of the study as one tidy row, failed, pruned and running ones included. A
    trial continued by another after an interrupt is a segment of that one (its record
    counts the `segments`), not a row of its own."""
    sweep = sweep or stored_sweep(study)
    setting_keys = [k for k in SCHEMA if k != "seed"]
    rows = []
    trials = study.get_trials(deepcopy=False)
    continued = {t.user_attrs.get("resumes") for t in trials} - {None}
    for t in trials:
        record = TrialRecord.of(t)
        if record.outcome == Outcome.WAITING or t.number in continued:
            continue
        s = _settings_of(record, t, sweep)
        row: dict[str, Any] = {
            "study": study.study_name,
            "trial": t.number,
            "state": record.outcome.value,
            "model.name": s.get("model.name"),
        }
        row.update({k: s.get(k) for k in setting_keys})
        row["seed"] = s.get("seed")
        stored = record.fields()
        row.update({k: stored[k] for k in COLUMNS})
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["datetime_complete"] = t.datetime_complete.isoformat() if t.datetime_complete else None
        row["error_message"] = record.error_message
        rows.append(row)
    columns = [
        "study",
        "trial",
        "state",
        "model.name",
        *setting_keys,
        "seed",
        *COLUMNS,
        "datetime_start",
        "datetime_complete",
        "error_message",
    ]
    df = pd.DataFrame(rows, columns=columns)
    return _ordered(df, sweep)


def _ordered(df: pd.DataFrame, sweep: Sweep) -> pd.DataFrame:
    """Rows by swept factor (in the file's order of values), then seed, then trial."""
    keys, sort_cols = [], []
    for key in [k for k in sweep.swept if k != "seed"] + ["seed", "trial"]:
        if key not in df:
            continue
        col = f"__order_{key}"
        values = sweep.params[key].values if key in sweep.params else None
        if values is not None:
            rank = {repr(v): i for i, v in enumerate(values)}
            df[col] = df[key].map(lambda v, r=rank: r.get(repr(v), len(r)))
        else:
            df[col] = df[key]
        keys.append(col)
        sort_cols.append(col)
    df = df.sort_values(sort_cols, kind="stable").drop(columns=keys)
    return df.reset_index(drop=True)
