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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ablations.impute import ImputingSampler
from ablations.liveness import is_stale
from ablations.record import DONE, Outcome, TrialRecord
from ablations.settings import SCHEMA
from ablations.storage import default_url, describe_url, open_storage
from ablations.sweep_file import DEFINING, Sweep, SweepError, cell_id, check_study_name, parse

MAX_ATTEMPTS = 2  # a cell whose trial raised is tried this many times in all, then left

DEFINITION_ATTR = "sweep.definition"

DONE_STATES = DONE


def sampler_for(sweep: Sweep, worker: int = 0) -> optuna.samplers.BaseSampler:
    # every worker rebuilds the sampler from the file; distinct seeds stop two workers of a
    # random sweep from drawing the same sequence
    seed = zlib.crc32(sweep.name.encode()) % 2**31 + worker
    if sweep.method == "bayes":
        # one objective or several (multi-objective TPE); running trials count as the worst
        # (Optuna's constant liar) unless metric.impute_while_running says false
        liar = {} if sweep.liar is None else {"constant_liar": sweep.liar}
        tpe = optuna.samplers.TPESampler(seed=seed, **liar)
        return ImputingSampler(tpe, sweep) if sweep.impute else tpe
    return optuna.samplers.RandomSampler(seed=seed)


def pruner_for(sweep: Sweep) -> optuna.pruners.BasePruner:
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
    sweep: Sweep, url: str, study_name: str, *, create: bool, worker: int = 0
) -> optuna.Study:
    """Create or join; a name reused with a different definition is refused before writing."""
    storage = open_storage(url, create=create)
    directions = [goal for _, goal in sweep.objectives]
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
                changed = sorted(k for k in DEFINING if old.get(k) != new.get(k))
                raise SweepError(
                    f"study {study_name!r} in {describe_url(url)} was made from a different "
                    f"sweep definition (differs in: {', '.join(changed)}); use another name "
                    "(--study NAME) or the original file"
                )
    elif not create:
        raise SweepError(f"no study {study_name!r} in {describe_url(url)}")
    if study_name in existing:  # loaded: create_study would append a duplicate to a journal
        study = optuna.load_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler_for(sweep, worker),
            pruner=pruner_for(sweep),
        )
    else:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            directions=directions,
            sampler=sampler_for(sweep, worker),
            pruner=pruner_for(sweep),
            load_if_exists=True,  # another machine may create it at the same moment
        )
    if study.metric_names is None:  # optuna-dashboard labels the objective with it
        with warnings.catch_warnings():  # experimental in Optuna 5.0, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([name for name, _ in sweep.objectives])
    if written_out:  # the file now says what the study ran with: store it as written
        study.set_user_attr(DEFINITION_ATTR, new)
    if study_name not in existing:
        study.set_user_attr(DEFINITION_ATTR, new)
        study.set_user_attr("sweep.name", sweep.name)
        study.set_user_attr("sweep.description", sweep.description)
        study.set_user_attr("sweep.swept", sweep.swept)
    return study


MAX_CONSECUTIVE_FAILURES = 5  # a random/bayes sweep stops after this many failed trials in a row


def trial_state(t: FrozenTrial) -> Outcome:
    """How the trial ended, or that it has not (its record's outcome)."""
    return TrialRecord.of(t).outcome


RETRY_ATTR = "sweep.retry_from"  # trials numbered below it no longer count as attempts


def retry_from(study: optuna.Study) -> int:
    """Set by `ablate sweep --retry-failed`: failures before it are forgiven."""
    return int(study.user_attrs.get(RETRY_ATTR, 0))


SKIPPED_ATTR = "sweep.skipped"  # grid cells the launcher's preflight found cannot run


def skipped(study: optuna.Study) -> set[str]:
    return set(study.user_attrs.get(SKIPPED_ATTR, []))


@dataclass
class CellState:
    """A grid cell, its trials, and its state: an outcome of DONE_STATES, running, failed
    (given up after MAX_ATTEMPTS failed trials) or left (still to run)."""

    cell: dict[str, Any]
    trials: list[FrozenTrial] = field(default_factory=list)
    state: str = "left"


def cell_states(
    sweep: Sweep, trials: list, since: int = 0, skip: set[str] = frozenset()
) -> dict[str, CellState]:
    """Per grid cell (by cell_id), its state; interrupted trials are not attempts, and
    failed ones numbered below `since` (see retry_from) no longer count."""
    valid, _ = sweep.cells()
    cells = {cell_id(c): CellState(c) for c in valid if cell_id(c) not in skip}
    for t in trials:
        cid = t.user_attrs.get("cell")
        if cid in cells:
            cells[cid].trials.append(t)
    for entry in cells.values():
        states = [trial_state(t) for t in entry.trials]
        attempts = [trial_state(t) for t in entry.trials if t.number >= since]
        if any(s.done for s in states):
            entry.state = next(s for s in states if s.done)
        elif Outcome.RUNNING in states:
            entry.state = Outcome.RUNNING
        elif attempts.count(Outcome.FAILED) >= MAX_ATTEMPTS:
            entry.state = Outcome.FAILED
    return cells


def study_cells(study: optuna.Study, sweep: Sweep) -> dict[str, CellState]:
    """cell_states of a study, with its retries and skipped cells taken into account."""
    return cell_states(sweep, study.get_trials(deepcopy=False), retry_from(study), skipped(study))


@dataclass(frozen=True)
class Totals:
    """done, running and failed trials; left: cells (or trials) still to run; given_up: grid
    cells left after MAX_ATTEMPTS failures, or a random/bayes sweep's remainder once it
    stopped on consecutive failures; cells: the grid's cells, or the run cap."""

    done: int
    running: int
    failed: int
    left: int
    given_up: int
    cells: int

    @property
    def unfinished(self) -> int:
        return self.left + self.running


def totals(study: optuna.Study, sweep: Sweep) -> Totals:
    trials = study.get_trials(deepcopy=False)
    states = [trial_state(t) for t in trials]
    failed = states.count(Outcome.FAILED)
    if sweep.method == "grid":
        by = [e.state for e in study_cells(study, sweep).values()]
        return Totals(
            done=sum(s in DONE_STATES for s in by),
            running=by.count(Outcome.RUNNING),
            failed=failed,
            left=by.count("left"),
            given_up=by.count(Outcome.FAILED),
            cells=len(by),
        )
    done = sum(s.done for s in states)
    running = states.count(Outcome.RUNNING)
    remaining = max(0, sweep.run_cap - done - running)
    stopped = failure_streak(trials, retry_from(study)) is not None
    if target_reached(study, sweep):
        remaining = 0  # W&B's metric.target met: the sweep is done
    return Totals(
        done=done,
        running=running,
        failed=failed,
        left=0 if stopped else remaining,
        given_up=remaining if stopped else 0,
        cells=sweep.run_cap,
    )


def target_reached(study: optuna.Study, sweep: Sweep) -> bool:
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
    than fail forever (a missing data set would otherwise fail thousands of trials a minute)."""
    ordered = sorted((t for t in trials if t.number >= since), key=lambda t: t.number)
    unfinished = (Outcome.RUNNING, Outcome.INTERRUPTED, Outcome.WAITING)
    finished = [t for t in ordered if trial_state(t) not in unfinished]
    last = finished[-MAX_CONSECUTIVE_FAILURES:]
    if len(last) < MAX_CONSECUTIVE_FAILURES or any(trial_state(t) != Outcome.FAILED for t in last):
        return None
    return last[-1].user_attrs.get("error_message") or "no error message recorded"


def errors(study: optuna.Study) -> dict[str, int]:
    """Each distinct error message of the study's failed trials, with its count."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if trial_state(t) == Outcome.FAILED:
            msg = t.user_attrs.get("error_message") or "no error message recorded"
            out[msg] = out.get(msg, 0) + 1
    return out


def stale_pending(study: optuna.Study) -> bool:
    """RUNNING trials whose workers died: a run of the command must recover them."""
    return any(is_stale(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def find(name: str | None, url: str | None, runs_dir: Path) -> tuple[optuna.Study, Sweep]:
    """The study by name (or the only one) in a storage URL or under runs_dir, and its sweep:
    the one lookup of status, export, visualize and dashboard."""
    if name is not None:
        check_study_name(name)
    if url is None:
        names = sorted(p.parent.name for p in runs_dir.glob("*/optuna.journal"))
        if name is None:
            if len(names) != 1:
                raise SweepError(
                    f"name the study; studies under {runs_dir}: {', '.join(names) or 'none'}"
                )
            name = names[0]
        url = default_url(name, runs_dir)
        if not Path(url).exists():
            raise SweepError(
                f"no study {name!r} under {runs_dir}; studies under {runs_dir}: "
                f"{', '.join(names) or 'none'}"
            )
    storage = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not names:
        raise SweepError(f"storage {describe_url(url)} has no studies")
    if name is None:
        if len(names) != 1:
            raise SweepError(f"name the study; studies in {describe_url(url)}: {', '.join(names)}")
        name = names[0]
    if name not in names:
        raise SweepError(
            f"unknown study {name!r}; studies in {describe_url(url)}: {', '.join(names)}"
        )
    study = optuna.load_study(study_name=name, storage=storage)
    return study, stored_sweep(study)


def stored_sweep(study: optuna.Study) -> Sweep:
    """The sweep a study was made from, rebuilt from its stored definition."""
    if DEFINITION_ATTR not in study.user_attrs:
        raise SweepError(
            f"study {study.study_name!r} was not made by `ablate sweep` (it has no stored "
            "sweep definition); status, export and visualize read only such studies"
        )
    definition = {k: v for k, v in study.user_attrs[DEFINITION_ATTR].items() if v is not None}
    return parse(
        {
            "name": study.user_attrs.get("sweep.name", study.study_name),
            **definition,
            "run_cap": study.user_attrs.get("sweep.run_cap") or 1,
        }
    )


def suggest(trial: optuna.Trial, sweep: Sweep) -> dict[str, Any]:
    """The trial's values of the swept settings, drawn by the study's sampler."""
    params = {}
    for key in sweep.swept:
        p = sweep.params[key]
        if p.values is not None:
            params[key] = trial.suggest_categorical(key, list(p.values))
        elif SCHEMA[key].type is int:
            params[key] = trial.suggest_int(
                key, int(p.low), int(p.high), step=p.step or 1, log=p.log
            )
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return params
