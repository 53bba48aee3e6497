"""`tune.scheduler: moasha` for Ray Tune: `segtune.sweep.moasha.Halving` as a `TrialScheduler`,
built like Ray's `AsyncHyperBandScheduler` on `FIFOScheduler` (trials start in order; only the
stop decision is ours)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from segtune.sweep.moasha import Halving


class MOASHA(FIFOScheduler):
    """Stop a trial whose result loses at a rung. A result without every objective (a cost that
    only the final result carries) is not judged: the trial goes on."""

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
        if epoch is None or not all(isinstance(v, numbers.Real) for v in values):
            return TrialScheduler.CONTINUE
        if self.halving.on_result(trial.trial_id, int(epoch), values):
            return TrialScheduler.CONTINUE
        self.stopped += 1
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        return f"Using MO-ASHA: num_stopped={self.stopped}"
