"""Sweep files: W&B's sweep-configuration schema, validated in full, run by Optuna."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ablations import settings
from ablations.sweep_params import (
    Param,
    SweepError,
    _check_keys,
    _err,
    flatten,
    param,
)
from lightning_modules.family import SpecError

TOP_KEYS = (
    "name",
    "description",
    "method",
    "metric",
    "parameters",
    "run_cap",
    "early_terminate",
    "project",
    "entity",
    "selection",
    "metrics",
    "scheduler",
    *("program", "command", "controller", "apiVersion", "kind", "job", "image_uri"),
)
# Keys only W&B's agent reads (which script to start and how): accepted, ignored with a note,
# since here the worker runs the trial itself.
AGENT_ONLY = {
    "program": "the script W&B's agent starts; here each worker trains the trial itself",
    "command": "the agent's command line; here each worker trains the trial itself",
    "controller": "where W&B's sweep controller runs; here the study is the controller",
    "apiVersion": "the version of W&B's file format; this file is read as its current schema",
    "kind": "W&B's name for the document, always sweep",
    "job": "the W&B Launch job its agent would run; here each worker trains the trial itself",
    "image_uri": "the container W&B Launch would run; here each worker trains the trial itself",
    "early_terminate.s": "hyperband brackets are Optuna's HyperbandPruner's own choice",
    "early_terminate.strict": "Optuna's HyperbandPruner has no strict mode",
}
# `selection` is ours, not W&B's: the cells a final sweep retrains, as written by
# `ablate export --final-sweep` (ablations/export.py), and how they were chosen.
SELECTION_KEYS = ("study", "by", "over", "cells")
METHODS = {
    "grid": "Optuna GridSampler semantics (every cell once)",
    "random": "RandomSampler",
    "bayes": "TPESampler",
}
GOALS = ("minimize", "maximize")
METRICS = ("val/error", "val/loss", "train/loss", "test/error")
# what a trial costs, as its record has it: an objective of a multi-objective sweep
COSTS = ("params", "macs", "fit_seconds")
METRIC_KEYS = ("name", "goal", "target", "impute", "impute_while_running")
IMPUTE = ("latest", "best", "worst")
SCHEDULER_KEYS = ("engine", "source", "optimizer", "search_space")
EARLY_TERMINATE_KEYS = ("type", "min_iter", "max_iter", "eta", "s", "strict")
# Keys a definition is compared on when a study name is reused; the rest may change.
DEFINING = ("method", "metric", "metrics", "parameters", "early_terminate", "selection")


@dataclass
class Sweep:
    name: str
    method: str
    metric: str
    goal: str
    params: dict[str, Param]
    description: str = ""
    run_cap: int | None = None
    hyperband: dict[str, int] | None = None
    project: str | None = None
    entity: str | None = None
    selection: dict[str, Any] | None = None
    raw: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # keys accepted and ignored, and why
    target: float | None = None  # W&B's metric.target: no new trial once a trial reaches it
    # every objective as (name, goal): one for `metric:`, two or more for `metrics:`; `metric`
    # and `goal` above are the first
    objectives: list[tuple[str, str]] = field(default_factory=list)
    # metric.impute per objective: the value a failed or diverged trial counts as (bayes)
    impute: dict[str, str] = field(default_factory=dict)
    # metric.impute_while_running (bayes): worst is TPE's constant liar, false turns it off;
    # None: Optuna's default (on)
    liar: bool | None = None

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    @property
    def base(self) -> dict[str, Any]:
        return {k: p.values[0] for k, p in self.params.items() if p.fixed}

    @property
    def swept(self) -> list[str]:
        return [k for k, p in self.params.items() if not p.fixed]

    def definition(self) -> dict[str, Any]:
        return {k: self.raw.get(k) for k in DEFINING}

    def fingerprint(self) -> str:
        blob = json.dumps(self.definition(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def cells(self) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
        """Grid: (valid cells, invalid cells with the reason), in the file's order.

        With a `selection`, the grid is each selected cell times the other swept values (the
        seeds, say), not the product of every swept key."""
        chosen = (self.selection or {}).get("cells") or [{}]
        valid, invalid = [], []
        for pick in chosen:
            keys = [k for k in self.swept if k not in pick]
            for combo in itertools.product(*(self.params[k].values for k in keys)):
                cell = {k: v for k, v in pick.items() if k in self.swept}
                cell.update(zip(keys, combo))
                cell = {k: cell[k] for k in self.swept}
                self._check(cell, valid, invalid)
        return valid, invalid

    def _check(self, cell: dict[str, Any], valid: list, invalid: list) -> None:
        try:
            settings.resolve({**self.base, **cell})
        except (settings.SettingsError, SpecError) as err:
            invalid.append((cell, str(err)))
        else:
            valid.append(cell)

    def epochs(self, cell: dict[str, Any]) -> int:
        return int({**settings.defaults(), **self.base, **cell}["train.epochs"])


STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_study_name(name: str, where: str = "study name") -> str:
    """A study name is a folder under runs/: one plain path component, no `..`, no `/`."""
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name) or ".." in name:
        raise SweepError(
            f"{where} {name!r} is not a valid study name: use letters, digits, '_', '-' and "
            "'.' (not '..'), starting with a letter or digit; it names a folder under runs/"
        )
    return name


def cell_id(cell: dict[str, Any]) -> str:
    """A cell's identity: its swept values, as canonical JSON."""
    return json.dumps(cell, sort_keys=True, default=str)


def _selection(raw: Any, params: dict[str, Param]) -> dict[str, Any] | None:
    """The `selection` block: its cells become swept keys with the values they take."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _err(f"selection: expected a mapping with {', '.join(SELECTION_KEYS)}")
    _check_keys("selection", raw, SELECTION_KEYS)
    cells = raw.get("cells")
    if not isinstance(cells, list) or not cells or not all(isinstance(c, dict) for c in cells):
        raise _err("selection.cells: expected a non-empty list of mappings of settings")
    over = raw.get("over") or {}
    if not isinstance(over, dict):
        raise _err("selection.over: expected a mapping from a setting to its candidates")
    for key in {k for c in cells for k in c}:
        if key in params:
            raise _err(f"selection.cells sets {key}, which parameters sets too")
        values: list = []
        for c in cells:
            if key not in c:
                raise _err(f"selection.cells: every cell must set {key}")
            try:
                v = settings.coerce(key, c[key])
            except settings.SettingsError as err:
                raise _err(f"selection.cells: {err}") from None
            c[key] = v
            if repr(v) not in map(repr, values):
                values.append(v)
        params[key] = Param(key, tuple(values))
    return {"study": raw.get("study"), "by": raw.get("by"), "over": over, "cells": cells}


def _metric(m: Any, where: str, keys: tuple[str, ...], valid: tuple[str, ...]) -> tuple[str, str]:
    if not isinstance(m, dict):
        raise _err(f"{where}: expected a mapping with name and goal, got {m!r}")
    _check_keys(where, m, keys)
    name, goal = m.get("name", "val/error"), m.get("goal", "minimize")
    if name not in valid:
        raise _err(f"{where}.name={name!r} is not one of the valid values: {', '.join(valid)}")
    if goal not in GOALS:
        raise _err(f"{where}.goal={goal!r} is not one of the valid values: {', '.join(GOALS)}")
    impute = m.get("impute")
    if impute is not None and impute not in IMPUTE:
        raise _err(f"{where}.impute={impute!r} is not one of the valid values: {', '.join(IMPUTE)}")
    return name, goal


def _objectives(
    raw: dict, method: str
) -> tuple[list[tuple[str, str]], float | None, dict[str, str], bool | None, list[str]]:
    """`metric:` or `metrics:` (W&B's multi-objective form) and `scheduler:`: the objectives,
    metric.target, the impute rule per objective, TPE's constant liar, and notes."""
    notes: list[str] = []
    if "scheduler" in raw:
        notes += _scheduler(raw["scheduler"], method)
    if method == "custom":
        raise _err(
            "method=custom hands the search to a scheduler's own code (engine optuna or ax "
            "with source:), which this tool does not run; write the search space under "
            "parameters and use method bayes (Optuna's TPESampler, multi-objective with "
            "metrics:), random or grid"
        )
    if "metric" in raw and "metrics" in raw:
        raise _err("metric and metrics: give one (metrics: for several objectives)")
    if "metrics" in raw:
        items = raw["metrics"]
        if not isinstance(items, list) or len(items) < 2:
            raise _err(
                "metrics: expected a list of two or more {name, goal} mappings "
                "(one objective: metric:)"
            )
        for i, m in enumerate(items):
            if isinstance(m, dict):
                for key, why in (
                    ("target", "stops the sweep when one trial reaches it, which with several "
                     "objectives has no one meaning"),
                    ("impute_while_running", "is one setting of the search, not of one "
                     "objective: give it in none or remove it"),
                ):  # fmt: skip
                    if key in m:
                        raise _err(f"metrics[{i}].{key}: not with several objectives: it {why}")
        metrics = [(m, f"metrics[{i}]") for i, m in enumerate(items)]
        keys: tuple[str, ...] = ("name", "goal", "impute")
        valid: tuple[str, ...] = (*METRICS, *COSTS)  # error against what it costs
    else:
        metrics = [(raw.get("metric", {"name": "val/error", "goal": "minimize"}), "metric")]
        keys, valid = METRIC_KEYS, METRICS
    objectives = [_metric(m, where, keys, valid) for m, where in metrics]
    names = [n for n, _ in objectives]
    if len(set(names)) != len(names):
        raise _err(f"metrics: {', '.join(names)}: an objective is given twice")
    first = metrics[0][0]
    target = first.get("target") if keys == METRIC_KEYS else None
    if target is not None and (not isinstance(target, int | float) or isinstance(target, bool)):
        raise _err(f"metric.target={target!r} must be a number")
    impute = {n: m["impute"] for (n, _), (m, _) in zip(objectives, metrics) if "impute" in m}
    if impute and method != "bayes":
        notes.append(
            f"metric.impute: accepted and ignored (only a bayes search learns from past "
            f"trials; method {method} draws without them)"
        )
        impute = {}
    liar = None
    running = first.get("impute_while_running") if keys == METRIC_KEYS else None
    if running is not None:
        if running not in (*IMPUTE, "false", False):
            raise _err(
                f"metric.impute_while_running={running!r} is not one of the valid values: "
                "latest, best, worst, false"
            )
        if running in ("latest", "best"):
            raise _err(
                f"metric.impute_while_running={running}: Optuna's TPE can count a running "
                "trial only as its worst (constant liar); write worst, or false"
            )
        if running == "worst" and method != "bayes":
            notes.append(
                f"metric.impute_while_running: accepted and ignored (method {method} "
                "learns nothing from running trials)"
            )
        if method == "bayes":
            liar = running == "worst"
    return objectives, None if target is None else float(target), impute, liar, notes


def _scheduler(sched: Any, method: str) -> list[str]:
    if not isinstance(sched, dict) or "engine" not in sched:
        raise _err(f"scheduler: expected a mapping with engine, got {sched!r}")
    _check_keys("scheduler", sched, SCHEDULER_KEYS)
    engine = sched["engine"]
    if engine not in ("optuna", "ax", "wandb"):
        raise _err(f"scheduler.engine={engine!r} is not one of the valid values: optuna, ax, wandb")
    if engine != "wandb" or "source" in sched:
        source = sched.get("source")
        code = f"the code in {source}" if source else "code of its own"
        raise _err(
            f"scheduler.engine={engine}: the search would run {code}, and this tool does not "
            "run code named in a sweep file; remove scheduler, write the search space under "
            "parameters and use method bayes (Optuna's TPESampler), random or grid"
        )
    return [f"scheduler: accepted and ignored (engine wandb is W&B's own {method} search, "
            f"which method {method} runs here)"]  # fmt: skip


def parse(raw: Any, source: str = "sweep file") -> Sweep:
    """Validate a sweep definition (a dict loaded from YAML); raises SweepError."""
    if not isinstance(raw, dict):
        raise _err(f"{source}: expected a mapping of sweep keys, got {type(raw).__name__}")
    _check_keys(source, raw, TOP_KEYS)
    for key in ("name", "method", "parameters"):
        if key not in raw:
            raise _err(f"{source}: missing required key {key!r}")
    name = raw["name"]
    try:
        check_study_name(name, "name:")
    except SweepError as err:
        raise _err(str(err)) from None
    method = raw["method"]
    if method not in (*METHODS, "custom"):
        raise _err(f"method={method!r} is not one of the valid values: {', '.join(METHODS)}")
    for key in ("apiVersion", "job", "image_uri"):
        if key in raw and not isinstance(raw[key], str):
            raise _err(f"{key}: expected a string, got {raw[key]!r}")
    if "kind" in raw and raw["kind"] != "sweep":
        raise _err(f"kind={raw['kind']!r}: a sweep file's kind is sweep")
    objectives, target, impute, liar, notes = _objectives(raw, method)
    if not isinstance(raw["parameters"], dict) or not raw["parameters"]:
        raise _err("parameters: expected a non-empty mapping of setting keys")
    params_raw = flatten(raw["parameters"])
    for key in params_raw:
        if key not in settings.SCHEMA:
            raise _err(
                f"parameters: unknown setting {key!r}"
                f"{settings.suggest(str(key), list(settings.SCHEMA))}"
                f" (valid keys: {', '.join(settings.SCHEMA)})"
            )
    params = {k: param(k, v) for k, v in params_raw.items()}
    selection = _selection(raw.get("selection"), params)
    if "model.variant" in params:
        clash = [k for k in ("model.pooling", "model.strided_conv") if k in params]
        if clash:
            raise _err(
                f"parameters: model.variant sets model.pooling and model.strided_conv; "
                f"do not also set {' and '.join(clash)}"
            )
    if method == "grid":
        continuous = [k for k, p in params.items() if p.distribution]
        if continuous:
            raise _err(
                f"method=grid needs 'values' lists; {', '.join(continuous)} "
                "has a continuous distribution (use random or bayes)"
            )
    run_cap = raw.get("run_cap")
    if run_cap is not None and (
        not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1
    ):
        raise _err(f"run_cap={run_cap!r} must be a positive integer")
    if method != "grid" and run_cap is None:
        raise _err(f"method={method} needs run_cap (the number of trials)")
    hyperband = None
    if "early_terminate" in raw:
        et = raw["early_terminate"]
        if not isinstance(et, dict):
            raise _err(f"early_terminate: expected a mapping, got {et!r}")
        _check_keys("early_terminate", et, EARLY_TERMINATE_KEYS)
        if et.get("type") != "hyperband":
            raise _err(
                f"early_terminate.type={et.get('type')!r} is not one of the valid values: hyperband"
            )
        hyperband = {}
        for key, default in (("min_iter", 1), ("eta", 3), ("max_iter", None)):
            value = et.get(key, default)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise _err(f"early_terminate.{key}={value!r} must be a positive integer")
            hyperband[key] = value
        if hyperband["eta"] < 2:
            raise _err("early_terminate.eta must be at least 2")
    for key in ("project", "entity", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise _err(f"{key}: expected a string, got {raw[key]!r}")
    notes += [f"{k}: accepted and ignored ({AGENT_ONLY[k]})" for k in AGENT_ONLY if k in raw]
    notes += [
        f"early_terminate.{k}: accepted and ignored ({AGENT_ONLY['early_terminate.' + k]})"
        for k in ("s", "strict")
        if k in raw.get("early_terminate", {})
    ]
    if hyperband is not None and len(objectives) > 1:
        raise _err(
            "early_terminate with metrics: Optuna's pruners compare one objective; "
            "prune on one metric (metric:) or drop early_terminate"
        )
    sweep = Sweep(
        name=name,
        method=method,
        metric=objectives[0][0],
        goal=objectives[0][1],
        params=params,
        description=raw.get("description") or "",
        run_cap=run_cap,
        hyperband=hyperband,
        project=raw.get("project"),
        entity=raw.get("entity"),
        selection=selection,
        raw={**raw, "parameters": params_raw},
        notes=notes,
        target=None if target is None else float(target),
        objectives=objectives,
        impute=impute,
        liar=liar,
    )
    held_out = [m for m, _ in objectives if m.startswith("val/")]
    if params.get("data.val_size") and params["data.val_size"].values == (0,) and held_out:
        raise _err(
            f"metric.name={held_out[0]}: data.val_size=0 holds out no validation "
            "images; a sweep that trains on every image selects nothing, so use "
            "metric train/loss (as ablate export --final-sweep writes)"
        )
    try:
        settings.resolve(sweep.base)
    except (settings.SettingsError, SpecError) as err:
        raise _err(f"parameters: the fixed values are invalid: {err}") from None
    if method == "grid":
        valid, _ = sweep.cells()
        if not valid:
            raise _err("parameters: every grid cell is an invalid combination")
    return sweep


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last,
    silently: a sweep would run something other than what its file seems to say)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _err(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(path: str | Path) -> Sweep:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise _err(f"{path}: no such sweep file") from None
    except IsADirectoryError:
        raise _err(f"{path} is a directory; give a sweep file (YAML)") from None
    except UnicodeDecodeError:
        raise _err(f"{path} is not a text file; give a sweep file (YAML)") from None
    except SweepError as err:
        raise _err(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise _err(f"{path}: not valid YAML: {err}") from None
    return parse(raw, str(path))


def write_snapshot(sweep: Sweep, path: Path, source: str) -> Path:
    """The sweep as the launcher read it, for its workers: an edit to the file while the
    sweep runs changes nothing under it (a later run with the edit is checked afresh)."""
    text = f"# {source} as read by `ablate sweep` at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    text += yaml.safe_dump(sweep.raw, sort_keys=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
