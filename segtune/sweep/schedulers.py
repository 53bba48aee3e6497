"""The trial schedulers of a sweep for Ray Tune. `tune.scheduler: moasha` is
`segtune.sweep.moasha.Halving` as a `TrialScheduler`, built like Ray's `AsyncHyperBandScheduler`
on `FIFOScheduler` (trials start in order; only the stop decision is ours); `asha` is Ray's.
Neither ranks a trial that breaks tune.constraints: its one result holds the worst value of each
objective (±inf), which in a rung of Ray's ASHA makes the cutoff -inf or NaN (a percentile
between -inf and a score), so that the rung stops nothing, and in MO-ASHA could take a
promotion from a trained trial."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from segtune.sweep.feasible import INFEASIBLE_KEY
from segtune.sweep.moasha import Halving


class FeasibleASHA(ASHAScheduler):
    """Ray's ASHA whose rungs hold trained trials only."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(INFEASIBLE_KEY):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if result.get(INFEASIBLE_KEY):
            self.on_trial_remove(tune_controller, trial)
        else:
            super().on_trial_complete(tune_controller, trial, result)


class MOASHA(FIFOScheduler):
    """Stop a trial whose result loses at a rung. A result without every objective (a cost that
    only the final result carries), or of a trial never trained, is not judged."""

    def __init__(
        self,
        objectives: Sequence[tuple[str, str]],
        grace_period: int,
        reduction_factor: float,
        max_t: int,
        time_attr: str = "training_iteration",
    ) -> None:
        super().__init__()
        self.metrics = [metric for metric, _ in objectives]
        modes = [mode for _, mode in objectives]
        self.halving = Halving(modes, grace_period, reduction_factor, max_t)
        self.time_attr = time_attr
        self.stopped = 0

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        values = [result.get(metric) for metric in self.metrics]
        epoch = result.get(self.time_attr)
        judged = epoch is not None and all(isinstance(v, numbers.Real) for v in values)
        if result.get(INFEASIBLE_KEY) or not judged:
            return TrialScheduler.CONTINUE
        if self.halving.on_result(trial.trial_id, int(epoch), values):
            return TrialScheduler.CONTINUE
        self.stopped += 1
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        return f"Using MO-ASHA: num_stopped={self.stopped}"
