"""Ray's Optuna searcher with what segtune tells it beyond Ray's: under `tune.constraints` each
finished trial's constraint values are stored on its Optuna trial before Ray tells it, where the
sampler's `constraints_func` (TPE and NSGA-II take one) reads them, so that the sampler learns
where the feasible region is; under `tune.warm_start` the earlier sweeps' trials are added to the
study before its first suggestion (Ray's own `evaluated_rewards` takes one objective only).
Its own module: Optuna is imported only by sweeps that use it."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from ray.tune.search.optuna import OptunaSearch

from segtune.config.constraints import Constraint
from segtune.sweep.feasible import INFEASIBLE_KEY
from segtune.sweep.warm import Told

log = logging.getLogger(__name__)

CONSTRAINTS_ATTR = "segtune.constraints"  # the Optuna trial's user attribute of its violations


@dataclass(frozen=True)
class ConstraintValues:
    """The sampler's `constraints_func`: the violations stored on the trial (at most 0 where a
    constraint holds), or all infinite for a trial told without them."""

    count: int

    def __call__(self, trial: FrozenTrial) -> list[float]:
        return list(trial.user_attrs.get(CONSTRAINTS_ATTR, [math.inf] * self.count))


class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch that stores each trial's constraint violations, computed from the costs in
    its last result (every result carries them), on the Optuna trial before telling it, and
    whose study holds the earlier trials `told` before its first suggestion."""

    def __init__(
        self, constraints: Sequence[Constraint] = (), told: Sequence[Told] = (), **kwargs: Any
    ) -> None:
        self._constraints = list(constraints)
        self._told = list(told)
        super().__init__(**kwargs)

    def _violations(self, metrics: Mapping[str, Any]) -> list[float]:
        return [c.violation(metrics.get(c.column)) for c in self._constraints]

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        if not self._told or not isinstance(self._space, dict):
            return
        trials = []
        for earlier in self._told:
            params = {k: v for k, v in earlier.point.items() if k in self._space}
            attrs = (
                {CONSTRAINTS_ATTR: self._violations(earlier.metrics)} if self._constraints else {}
            )
            try:
                trials.append(optuna.trial.create_trial(
                    state=optuna.trial.TrialState.COMPLETE, values=earlier.values, params=params,
                    distributions={k: self._space[k] for k in params}, user_attrs=attrs,
                ))  # fmt: skip
            except ValueError as exc:  # a value outside this sweep's range
                log.info("warm start: %s not told to Optuna (%s)", earlier.point, exc)
        self._ot_study.add_trials(trials)
        self._told = []  # once: a restored searcher has its study already

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if not result.get(INFEASIBLE_KEY):  # its one result is no epoch's score
            super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if self._constraints and result and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(CONSTRAINTS_ATTR, self._violations(result))
        super().on_trial_complete(trial_id, result, error)
