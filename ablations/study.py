"""A sweep's Optuna study: create or join it, rebuild its sampler, read its cells' states.

The study is the single source of truth. Each grid cell is claimed under a lock (see
storage.claim_lock and worker.claim) and enqueued as a trial with its parameters fixed, so
racing workers never run a cell twice; Optuna's GridSampler alone cannot promise that (its docs
say so) and it counts failed trials as visited, which would stop a dead worker's cell from
being re-run. Random and bayes sweeps use Optuna's RandomSampler and TPESampler, which every
worker rebuilds from the file, since Optuna does not store samplers.

Imports neither torch nor Lightning: `ablate status` and `ablate export` read studies through
this module alone.
"""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ablations import settings as S
from ablations import storage as ST
from ablations import sweep_file as SF

MAX_ATTEMPTS = 2  # a cell whose trial raised is tried this many times in all, then left

DEFINITION_ATTR = "sweep.definition"

DONE_STATES = ("complete", "pruned", "diverged")


def sampler_for(sweep: SF.Sweep, worker: int = 0) -> optuna.samplers.BaseSampler:
    # every worker rebuilds the sampler from the file; distinct seeds stop two workers of a
    # random sweep from drawing the same sequence
    seed = zlib.crc32(sweep.name.encode()) % 2**31 + worker
    if sweep.method == "bayes":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def pruner_for(sweep: SF.Sweep) -> optuna.pruners.BasePruner:
    if sweep.hyperband is None:
        return optuna.pruners.NopPruner()
    hb = sweep.hyperband
    return optuna.pruners.HyperbandPruner(
        min_resource=hb["min_iter"],
        max_resource=hb["max_iter"] or "auto",
        reduction_factor=hb["eta"],
    )


def _defined(definition: dict[str, Any]) -> dict[str, Any]:
    """A stored definition without its unset keys: a study stored before a key existed
    (`selection`, say) has the same definition as a file that leaves it unset."""
    return {k: v for k, v in definition.items() if v is not None}


def only_written_out(old: dict[str, Any], new: dict[str, Any], trials: list) -> bool:
    """Whether `new` differs from `old` only by fixed parameters it adds, each with the value
    that every trial of the study ran with: a setting written out (say `data.preprocess:
    standardize` when its default changed), the same sweep, so the study resumes."""
    rest = {k: v for k, v in old.items() if k != "parameters"}
    if rest != {k: v for k, v in new.items() if k != "parameters"}:
        return False
    before, after = old.get("parameters") or {}, new.get("parameters") or {}
    if any(after.get(k) != v for k, v in before.items()):
        return False
    ran = [t.user_attrs["settings"] for t in trials if "settings" in t.user_attrs]
    added = {k: v for k, v in after.items() if k not in before}
    return bool(ran) and all(
        isinstance(spec, dict)
        and set(spec) == {"value"}
        and all(k in r and r[k] == spec["value"] for r in ran)
        for k, spec in added.items()
    )


def open_study(
    sweep: SF.Sweep, url: str, study_name: str, *, create: bool, worker: int = 0
) -> optuna.Study:
    """Create or join; a name reused with a different definition is refused before writing."""
    storage = ST.open_storage(url, create=create)
    direction = "minimize" if sweep.goal == "minimize" else "maximize"
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    new = _defined(json.loads(json.dumps(sweep.definition(), default=str)))
    written_out = False
    if study_name in existing:
        stored = existing[study_name].user_attrs.get(DEFINITION_ATTR)
        old = None if stored is None else _defined(stored)
        if old is not None and old != new:
            ran = storage.get_all_trials(storage.get_study_id_from_name(study_name))
            written_out = only_written_out(old, new, ran)
            if not written_out:
                changed = sorted(k for k in SF.DEFINING if old.get(k) != new.get(k))
                raise SF.SweepError(
                    f"study {study_name!r} in {ST.describe_url(url)} was made from a different "
                    f"sweep definition (differs in: {', '.join(changed)}); use another name "
                    "(--study NAME) or the original file"
                )
    elif not create:
        raise SF.SweepError(f"no study {study_name!r} in {ST.describe_url(url)}")
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction=direction,
        sampler=sampler_for(sweep, worker),
        pruner=pruner_for(sweep),
        load_if_exists=True,
    )
    if study.metric_names is None:  # optuna-dashboard labels the objective with it
        with warnings.catch_warnings():  # experimental in Optuna 5.0, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([sweep.metric])
    if written_out:  # the file now says what the study ran with: store it as written
        study.set_user_attr(DEFINITION_ATTR, new)
    if study_name not in existing:
        study.set_user_attr(DEFINITION_ATTR, new)
        study.set_user_attr("sweep.name", sweep.name)
        study.set_user_attr("sweep.description", sweep.description)
        study.set_user_attr("sweep.swept", sweep.swept)
    return study


MAX_CONSECUTIVE_FAILURES = 5  # a random/bayes sweep stops after this many failed trials in a row
INTERRUPTED_ATTR = "interrupted"  # set on a trial ended by a signal or a dead worker


def trial_state(t: optuna.trial.FrozenTrial) -> str:
    """complete, failed, interrupted, pruned, diverged, running or waiting.

    `interrupted`: stopped by a signal or by its worker's death, so it says nothing about the
    cell; it is run again and never counts as one of the cell's failed attempts."""
    if t.user_attrs.get("state") == "diverged":
        return "diverged"
    if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR):
        return "interrupted"
    return {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }[t.state]


RETRY_ATTR = "sweep.retry_from"  # trials numbered below it no longer count as attempts


def retry_from(study: optuna.Study) -> int:
    """Set by `ablate sweep --retry-failed`: failures before it are forgiven."""
    return int(study.user_attrs.get(RETRY_ATTR, 0))


SKIPPED_ATTR = "sweep.skipped"  # grid cells the launcher's preflight found cannot run


def skipped(study: optuna.Study) -> set[str]:
    return set(study.user_attrs.get(SKIPPED_ATTR, []))


def cell_states(
    sweep: SF.Sweep, trials: list, since: int = 0, skip: set[str] = frozenset()
) -> dict[str, dict[str, Any]]:
    """Per grid cell: its state (done / running / failed / left) and its trials; a cell is
    given up (failed) after MAX_ATTEMPTS failed trials, interrupted ones not counted."""
    valid, _ = sweep.cells()
    cells = {
        SF.cell_id(c): {"cell": c, "trials": [], "state": "left"}
        for c in valid
        if SF.cell_id(c) not in skip
    }
    for t in trials:
        cid = t.user_attrs.get("cell")
        if cid in cells:
            cells[cid]["trials"].append(t)
    for entry in cells.values():
        states = [trial_state(t) for t in entry["trials"]]
        attempts = [trial_state(t) for t in entry["trials"] if t.number >= since]
        if any(s in DONE_STATES for s in states):
            entry["state"] = next(s for s in states if s in DONE_STATES)
        elif "running" in states:
            entry["state"] = "running"
        elif attempts.count("failed") >= MAX_ATTEMPTS:
            entry["state"] = "failed"
    return cells


def totals(study: optuna.Study, sweep: SF.Sweep) -> dict[str, int]:
    """done, running, failed (trials), left (cells or trials still to run), given_up (grid
    cells left after MAX_ATTEMPTS failures, or a random/bayes sweep's remainder once it
    stopped on consecutive failures) and cells."""
    trials = study.get_trials(deepcopy=False)
    states = [trial_state(t) for t in trials]
    since = retry_from(study)
    if sweep.method == "grid":
        cells = cell_states(sweep, trials, since, skipped(study))
        by = [e["state"] for e in cells.values()]
        return {
            "done": sum(s in DONE_STATES for s in by),
            "running": by.count("running"),
            "failed": states.count("failed"),
            "left": by.count("left"),
            "given_up": by.count("failed"),
            "cells": len(cells),
        }
    done = sum(s in DONE_STATES for s in states)
    remaining = max(0, sweep.run_cap - done - states.count("running"))
    stopped = failure_streak(trials, since) is not None
    if target_reached(study, sweep):
        remaining = 0  # W&B's metric.target met: the sweep is done
    return {
        "done": done,
        "running": states.count("running"),
        "failed": states.count("failed"),
        "left": 0 if stopped else remaining,
        "given_up": remaining if stopped else 0,
        "cells": sweep.run_cap,
    }


def target_reached(study: optuna.Study, sweep: SF.Sweep) -> bool:
    """W&B's metric.target: a completed trial at or beyond it ends the sweep (no new trials)."""
    if sweep.target is None:
        return False
    values = [t.value for t in study.get_trials(deepcopy=False) if t.value is not None]
    if sweep.goal == "minimize":
        return any(v <= sweep.target for v in values)
    return any(v >= sweep.target for v in values)


def failure_streak(trials: list, since: int = 0) -> str | None:
    """The error of the last MAX_CONSECUTIVE_FAILURES finished trials when every one of them
    failed (interrupted ones skipped), else None: a random or bayes sweep stops there rather
    than fail forever (a missing data set once made 5,681 failed trials in a minute)."""
    ordered = sorted((t for t in trials if t.number >= since), key=lambda t: t.number)
    finished = [t for t in ordered if trial_state(t) != "running"]
    finished = [t for t in finished if trial_state(t) not in ("interrupted", "waiting")]
    last = finished[-MAX_CONSECUTIVE_FAILURES:]
    if len(last) < MAX_CONSECUTIVE_FAILURES or any(trial_state(t) != "failed" for t in last):
        return None
    return last[-1].user_attrs.get("error_message") or "no error message recorded"


def errors(study: optuna.Study) -> dict[str, int]:
    """Each distinct error message of the study's failed trials, with its count."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if trial_state(t) == "failed":
            msg = t.user_attrs.get("error_message") or "no error message recorded"
            out[msg] = out.get(msg, 0) + 1
    return out


def stale_pending(study: optuna.Study) -> bool:
    """RUNNING trials whose workers died: a run of the command must recover them."""
    return any(
        ST.is_stale(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    )


def find(name: str | None, url: str | None, runs_dir: Path) -> tuple[optuna.Study, SF.Sweep]:
    """The study by name (or the only one) in a storage URL or under runs_dir, and its sweep."""
    if name is not None:
        SF.check_study_name(name)
    if url is None:
        if name is None:
            names = sorted(p.parent.name for p in runs_dir.glob("*/optuna.journal"))
            if len(names) != 1:
                raise SF.SweepError(
                    "name the study: " + (", ".join(names) or f"no studies under {runs_dir}")
                )
            name = names[0]
        url = ST.default_url(name, runs_dir)
        if not Path(url).exists():
            names = sorted(p.parent.name for p in runs_dir.glob("*/optuna.journal"))
            raise SF.SweepError(
                f"no study {name!r} under {runs_dir}; studies there: {', '.join(names) or 'none'}"
            )
    storage = ST.open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not names:
        raise SF.SweepError(f"no studies in {ST.describe_url(url)}")
    if name is None:
        if len(names) != 1:
            raise SF.SweepError(f"name the study: {', '.join(names)}")
        name = names[0]
    if name not in names:
        raise SF.SweepError(
            f"no study {name!r} in {ST.describe_url(url)}; studies there: {', '.join(names)}"
        )
    study = optuna.load_study(study_name=name, storage=storage)
    return study, stored_sweep(study)


def stored_sweep(study: optuna.Study) -> SF.Sweep:
    """The sweep a study was made from, rebuilt from its stored definition."""
    if DEFINITION_ATTR not in study.user_attrs:
        raise SF.SweepError(
            f"study {study.study_name!r} was not made by `ablate sweep` (it has no stored "
            "sweep definition); status, export and visualize read only such studies"
        )
    definition = {k: v for k, v in study.user_attrs[DEFINITION_ATTR].items() if v is not None}
    return SF.parse(
        {
            "name": study.user_attrs.get("sweep.name", study.study_name),
            **definition,
            "run_cap": study.user_attrs.get("sweep.run_cap") or 1,
        }
    )


def suggest(trial: optuna.Trial, sweep: SF.Sweep) -> dict[str, Any]:
    """The trial's values of the swept settings, drawn by the study's sampler."""
    params = {}
    for key in sweep.swept:
        p = sweep.params[key]
        if p.values is not None:
            params[key] = trial.suggest_categorical(key, list(p.values))
        elif S.SCHEMA[key].type is int:
            params[key] = trial.suggest_int(
                key, int(p.low), int(p.high), step=p.step or 1, log=p.log
            )
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return params
