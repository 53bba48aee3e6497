"""The trial schedulers of a sweep for Ray Tune. `tune.scheduler: moasha` is
`segtune.sweep.moasha.Halving` as a `TrialScheduler`, built like Ray's `AsyncHyperBandScheduler`
on `FIFOScheduler` (trials start in order; only the stop decision is ours); `asha` is Ray's.
Neither ranks a trial that breaks tune.constraints: its one result holds the worst value of each
objective (±inf), which in a rung of Ray's ASHA makes the cutoff -inf or NaN (a percentile
between -inf and a score), so that the rung stops nothing, and in MO-ASHA could take a
promotion from a trained trial. Ray saves no scheduler's state: a resumed sweep's (and the
trials `--accept-changes` adds) fill their rungs, at their first trial, from what the sweep's
trials logged to MLflow, instead of judging the rest against empty rungs."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from segtune.sweep.feasible import INFEASIBLE_KEY
from segtune.sweep.moasha import Halving
from segtune.tracking.address import server_health
from segtune.tracking.runs import epoch_values

log = logging.getLogger(__name__)


def logged_epochs(
    sweep_run: tuple[str, str], metrics: Sequence[str]
) -> dict[str, dict[int, list[float]]]:
    """The epochs the trials of `sweep_run` (tracking URI, sweep run id) logged so far, by
    trial id and epoch; none if MLflow cannot say (the rungs then start empty, as Ray's)."""
    problem = server_health(sweep_run[0])  # a lost server: retries would hold Tune's loop
    if problem is not None:
        log.warning("the scheduler's rungs start empty: the trials so far unread (%s)", problem)
        return {}
    try:
        return epoch_values(MlflowClient(sweep_run[0]), sweep_run[1], metrics)
    except MlflowException as exc:
        log.warning("the scheduler's rungs start empty: the trials so far unread (%s)", exc)
        return {}


class FeasibleASHA(ASHAScheduler):
    """Ray's ASHA whose rungs hold trained trials only, from the sweep's logged epochs on."""

    def __init__(self, sweep_run: tuple[str, str], **asha: Any) -> None:
        super().__init__(**asha)
        self.sweep_run: tuple[str, str] | None = sweep_run  # None once the rungs are filled

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if self.sweep_run is None:
            return
        epochs_of = logged_epochs(self.sweep_run, [self._metric])
        self.sweep_run = None
        for milestone, recorded in self._brackets[0]._rungs:  # Ray's one bracket (brackets=1)
            for trial_id, epochs in epochs_of.items():
                first = next((e for e in sorted(epochs) if e >= milestone), None)
                if first is not None and first <= self._max_t:
                    recorded.setdefault(trial_id, self._metric_op * epochs[first][0])

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
        sweep_run: tuple[str, str],
        time_attr: str = "training_iteration",
    ) -> None:
        super().__init__()
        self.sweep_run: tuple[str, str] | None = sweep_run  # None once the rungs are filled
        self.metrics = [metric for metric, _ in objectives]
        modes = [mode for _, mode in objectives]
        self.halving = Halving(modes, grace_period, reduction_factor, max_t)
        self.time_attr = time_attr
        self.stopped = 0

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if self.sweep_run is None:
            return
        for trial_id, epochs in logged_epochs(self.sweep_run, self.metrics).items():
            for epoch in sorted(epochs):  # each rung takes the trial's first epoch at or past it
                self.halving.on_result(trial_id, epoch, epochs[epoch])
        self.sweep_run = None

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
