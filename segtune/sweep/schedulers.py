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
import math
import numbers
from collections.abc import Sequence
from typing import Any

from mlflow.exceptions import MlflowException
from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from segtune.config.names import EPOCH_METRICS
from segtune.errors import ConfigError
from segtune.sweep.feasible import INFEASIBLE_KEY
from segtune.sweep.moasha import Halving
from segtune.tracking.query import TrackingError, load_sweep_data

log = logging.getLogger(__name__)

# where a scheduler reads what the sweep's trials logged: tracking URI, experiment, sweep run id
SweepRun = tuple[str, str, str]


def logged_rungs(
    sweep_run: SweepRun, metrics: Sequence[str], rungs: Sequence[int]
) -> dict[str, dict[int, list[float]]]:
    """What each trial of `sweep_run` logged at each rung it reached, by Ray trial id and rung
    (an epoch counted from 1, as Ray's training_iteration; MLflow's steps count from 0):
    `metrics` in order, a per-epoch one from its history, a cost from the run. A trial without
    all of them is left out: one never trained, or cut off before its costs reached its run.
    Nothing is read when no trial has a run yet (a new sweep) or MLflow does not answer (its
    check gives up within seconds, where retries would hold Tune's loop for minutes): the
    rungs then start empty, as Ray's."""
    uri, experiment, parent = sweep_run
    curves = [m for m in metrics if m in EPOCH_METRICS]
    try:
        data = load_sweep_data(experiment, uri, sweep_run_id=parent, history_keys=curves)
    except TrackingError as exc:  # no trial has a run yet: a new sweep
        log.debug("the scheduler's rungs start empty: %s", exc)
        return {}
    except (ConfigError, MlflowException) as exc:  # its server does not answer
        log.warning("the scheduler's rungs start empty: %s", exc)
        return {}
    out: dict[str, dict[int, list[float]]] = {}
    for _, row in data.table.iterrows():
        run = str(row["run_id"])
        at = {m: data.history(run, m) for m in curves}
        reached = {}
        for rung in rungs:
            values = [at[m].get(rung - 1) if m in at else row.get(m) for m in metrics]
            if all(isinstance(v, numbers.Real) and not math.isnan(v) for v in values):
                reached[rung] = [float(v) for v in values]
        if row["trial_id"] and reached:
            out[str(row["trial_id"])] = reached
    return out


class FeasibleASHA(ASHAScheduler):
    """Ray's ASHA whose rungs hold trained trials only, from the sweep's logged epochs on."""

    def __init__(self, sweep_run: SweepRun, **asha: Any) -> None:
        super().__init__(**asha)
        self.sweep_run: SweepRun | None = sweep_run  # None once the rungs are filled

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if self.sweep_run is None:
            return
        rungs = self._brackets[0]._rungs  # Ray's one bracket (brackets=1): [(milestone, {id: x})]
        logged = logged_rungs(self.sweep_run, [self._metric], [m for m, _ in rungs])
        self.sweep_run = None
        for milestone, recorded in rungs:
            for trial_id, values in logged.items():
                if milestone in values:
                    recorded.setdefault(trial_id, self._metric_op * values[milestone][0])

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
        sweep_run: SweepRun,
        time_attr: str = "training_iteration",
    ) -> None:
        super().__init__()
        self.sweep_run: SweepRun | None = sweep_run  # None once the rungs are filled
        self.metrics = [metric for metric, _ in objectives]
        modes = [mode for _, mode in objectives]
        self.halving = Halving(modes, grace_period, reduction_factor, max_t)
        self.time_attr = time_attr
        self.stopped = 0

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if self.sweep_run is None:
            return
        logged = logged_rungs(self.sweep_run, self.metrics, list(self.halving.recorded))
        self.sweep_run = None
        for trial_id, values in logged.items():
            for rung, objectives in values.items():
                self.halving.on_result(trial_id, rung, objectives)

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
