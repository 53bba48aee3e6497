"""Ray's Optuna searcher under a sweep's `tune.constraints`: each finished trial's constraint
values are stored on its Optuna trial before Ray tells it, where the sampler's `constraints_func`
(TPE and NSGA-II take one) reads them, so that the sampler learns where the feasible region is.
Its own module: Optuna is imported only by sweeps that use it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial
from ray.tune.search.optuna import OptunaSearch

from segtune.config.constraints import Constraint
from segtune.sweep.feasible import INFEASIBLE_KEY

CONSTRAINTS_ATTR = "segtune.constraints"  # the Optuna trial's user attribute of its violations


@dataclass(frozen=True)
class ConstraintValues:
    """The sampler's `constraints_func`: the violations stored on the trial (at most 0 where a
    constraint holds), or all infinite for a trial told without them."""

    count: int

    def __call__(self, trial: FrozenTrial) -> list[float]:
        return list(trial.user_attrs.get(CONSTRAINTS_ATTR, [math.inf] * self.count))


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that stores each trial's constraint violations, computed from the costs in
    its last result (every result carries them), on the Optuna trial before telling it."""

    def __init__(self, constraints: Sequence[Constraint], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._constraints = list(constraints)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if not result.get(INFEASIBLE_KEY):  # its one result is no epoch's score
            super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if result and trial_id in self._ot_trials:
            values = [c.violation(result.get(c.column)) for c in self._constraints]
            self._ot_trials[trial_id].set_user_attr(CONSTRAINTS_ATTR, values)
        super().on_trial_complete(trial_id, result, error)
