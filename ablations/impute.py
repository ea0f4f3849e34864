"""W&B's `metric.impute` for a bayes sweep: a failed or diverged trial counts, for the sampler,
as a completed one whose objective is the study's worst or best so far, or its own latest
value. Optuna's samplers learn only from completed (and pruned) trials, so the sampler is
handed a view of the study in which those trials are complete with the imputed values; the
study itself is never changed, and status, export and report see the trials as they ended.

An interrupted trial is not a result of its cell (it is continued), so it is never imputed.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from ablations.record import Outcome, TrialRecord
from ablations.sweep_file import Sweep

__all__ = ["ImputingSampler", "imputed"]


def _own(t: FrozenTrial, name: str) -> float | None:
    """A trial's latest finite value of `name`: its record's, else its last epoch's."""
    record = TrialRecord.of(t)
    value = record.get(name)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    for row in reversed(record.history):
        v = row.get(name)
        if isinstance(v, int | float) and math.isfinite(v):
            return float(v)
    return None


def imputed(trials: Sequence[FrozenTrial], sweep: Sweep) -> list[FrozenTrial]:
    """The failed and diverged trials as completed ones with their imputed objective values;
    a trial with an objective that has no rule, or no value to take, is left out."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    out = []
    for t in trials:
        if t.state != TrialState.FAIL:
            continue
        if TrialRecord.of(t).outcome not in (Outcome.FAILED, Outcome.DIVERGED):
            continue
        values = []
        for i, (name, goal) in enumerate(sweep.objectives):
            rule = sweep.impute.get(name)
            seen = [d.values[i] for d in done]
            if rule == "latest":
                values.append(_own(t, name))
            elif rule in ("worst", "best") and seen:
                worst = rule == "worst"
                values.append(max(seen) if (goal == "minimize") == worst else min(seen))
            else:
                values.append(None)
        if any(v is None for v in values):
            continue
        out.append(
            FrozenTrial(
                number=t.number,
                state=TrialState.COMPLETE,
                value=None,
                values=values,
                datetime_start=t.datetime_start,
                datetime_complete=t.datetime_complete,
                params=t.params,
                distributions=t.distributions,
                user_attrs=t.user_attrs,
                system_attrs=t.system_attrs,
                intermediate_values=t.intermediate_values,
                trial_id=t._trial_id,
            )
        )
    return out


class _ImputedStudy:
    """The study as the sampler reads it: failed and diverged trials complete, imputed."""

    def __init__(self, study: optuna.Study, sweep: Sweep) -> None:
        self._study, self._sweep = study, sweep

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=None, use_cache=use_cache)
        extra = imputed(trials, self._sweep)
        swapped = {t.number for t in extra}
        out = [t for t in trials if t.number not in swapped] + extra
        if states is not None:
            out = [t for t in out if t.state in states]
        return sorted(out, key=lambda t: t.number)

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)


class ImputingSampler(BaseSampler):
    """`base` (the sweep's TPE) reading the study with the sweep's imputed trials."""

    def __init__(self, base: BaseSampler, sweep: Sweep) -> None:
        self._base, self._sweep = base, sweep

    def _view(self, study: optuna.Study) -> Any:
        return _ImputedStudy(study, self._sweep)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._base.infer_relative_search_space(self._view(study), trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._base.sample_relative(self._view(study), trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._base.sample_independent(
            self._view(study), trial, param_name, param_distribution
        )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._base.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._base.reseed_rng()
