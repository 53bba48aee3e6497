"""A sweep's compute budget (`tune.budget`): device-hours or trial-epochs.

`Budget` wraps the search algorithm Tune would use (the grid's and random search's
BasicVariantGenerator, Optuna's SearchGenerator) and hands Tune a new trial only when a slot is
free and the spend so far, plus the running trials' expected remainder, plus the new trial's
expected cost stays within the budget; else it is finished: the running trials end, Tune ends
the sweep, and the sweep run keeps why (BUDGET_TAG) and what was spent (BUDGET_SPENT_METRIC).

Spend is measured, not estimated: a trial's wall time is Ray's `time_total_s` of its latest
result, times its resources (GPUs on GPU trials, CPUs on CPU trials). Expected costs come from
the mean time per epoch so far; before any epoch they are unknown and count as nothing. The
state is saved with the searcher's (Tune's experiment state), so `--resume` goes on counting.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient
from ray.tune.search import SearchAlgorithm

from segtune.config.names import BUDGET_SPENT_METRIC, BUDGET_TAG
from segtune.config.sweep import SweepConfig
from segtune.sweep.space import resolve_trial

STATE_FILE = "segtune-budget-state.json"  # .json: Tune downloads it with its own on --resume
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Before:
    """What the sweep's earlier experiments spent, as its sweep run records it: where the
    budget of the trials `--accept-changes` adds starts, so that a sweep has one budget."""

    spent: float = 0.0
    ended: int = 0  # their trials that ended: the step of BUDGET_SPENT_METRIC
    reached: str = ""  # BUDGET_TAG: no trial starts once it is reached


def budget_unit(sweep: SweepConfig) -> str:
    """What the sweep's budget counts: GPU-hours, core-hours or trial-epochs."""
    assert sweep.tune.budget is not None
    if sweep.tune.budget.device_hours is None:
        return "trial-epochs"
    return "GPU-hours" if sweep.tune.resources_per_trial.gpu > 0 else "core-hours"


def budget_limit(sweep: SweepConfig) -> float:
    """The budget in its unit (`budget_unit`)."""
    budget = sweep.tune.budget
    assert budget is not None
    return float(budget.device_hours if budget.device_hours is not None else budget.trial_epochs)


class Budget(SearchAlgorithm):
    """Tune's search algorithm `inner`, starting only the trials the budget can pay for, at
    most `slots` at once (Tune's own concurrency limit does not apply to a wrapper)."""

    def __init__(
        self,
        inner: SearchAlgorithm,
        sweep: SweepConfig,
        slots: int,
        tracking_uri: str,
        parent: str,
        before: Before = Before(),
    ) -> None:
        resources = sweep.tune.resources_per_trial
        self.inner, self.sweep, self.slots = inner, sweep, slots
        self.tracking_uri, self.parent = tracking_uri, parent
        self.limit, self.unit = budget_limit(sweep), budget_unit(sweep)
        self.hours = sweep.tune.budget is not None and sweep.tune.budget.device_hours is not None
        self.per_second = (resources.gpu or resources.cpu) / 3600.0  # device-hours per second
        # trial id -> [seconds so far, epochs done, epochs]; the trials started and not ended
        self.trials: dict[str, list[float]] = {}
        self.live: set[str] = set()
        self.before = before
        self.reached = before.reached
        # the trial the inner searcher made that the budget did not start: Optuna's study knows
        # it, Tune's trials do not (segtune.sweep.restore allows for it on --resume)
        self.refused = ""

    # --- what the budget counts ---------------------------------------------------------------
    def _rate(self) -> float | None:
        """Seconds per epoch over every epoch done so far; None before the first."""
        done = sum(t[1] for t in self.trials.values())
        return sum(t[0] for t in self.trials.values()) / done if done else None

    def _cost(self, seconds: float, epochs: float) -> float:
        return seconds * self.per_second if self.hours else epochs

    def spent(self) -> float:
        return self.before.spent + sum(self._cost(t[0], t[1]) for t in self.trials.values())

    def _expected(self, epochs: float) -> float:
        """The cost of `epochs` more epochs at the mean rate so far (0 while it is unknown)."""
        return self._cost((self._rate() or 0.0) * epochs, epochs)

    def committed(self) -> float:
        """Spent, plus what the running trials are expected to spend before they end."""
        left = sum(self.trials[t][2] - self.trials[t][1] for t in self.live if t in self.trials)
        return self.spent() + self._expected(left)

    # --- Tune's search-algorithm interface ----------------------------------------------------
    def next_trial(self) -> Any:
        if self.reached or len(self.live) >= self.slots:
            return None
        trial = self.inner.next_trial()
        if trial is None:
            return None
        epochs = resolve_trial(self.sweep, trial.config).epochs
        committed, needed = self.committed(), self._expected(epochs)
        if committed + needed > self.limit:
            self.reached = (
                f"reached: {committed:.4g} {self.unit} spent or committed by running trials, "
                f"and a next trial needs about {needed:.3g} more, over the budget of "
                f"{self.limit:g}; no new trial started after {self.before.ended + len(self.trials)}"
            )
            self.refused = trial.trial_id
            MlflowClient(self.tracking_uri).set_tag(self.parent, BUDGET_TAG, self.reached)
            return None
        self.trials[trial.trial_id] = [0.0, 0, epochs]
        self.live.add(trial.trial_id)
        return trial

    def _count(self, trial_id: str, result: dict | None) -> None:
        if result is None or trial_id not in self.trials:
            return
        entry = self.trials[trial_id]
        entry[0] = float(result.get("time_total_s", entry[0]))
        # each epoch is one result; a trial's final one (evaluation, benchmark) is not an epoch
        entry[1] = min(int(result.get("training_iteration", entry[1])), int(entry[2]))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._count(trial_id, result)
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        self._count(trial_id, result)
        self.live.discard(trial_id)
        ended = self.before.ended + len(self.trials) - len(self.live)
        MlflowClient(self.tracking_uri).log_metric(
            self.parent, BUDGET_SPENT_METRIC, self.spent(), step=ended
        )
        self.inner.on_trial_complete(trial_id, result=result, error=error)

    def is_finished(self) -> bool:
        return bool(self.reached) or self.inner.is_finished()

    def set_finished(self) -> None:
        self.inner.set_finished()

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    @property
    def metric(self) -> Any:
        return self.inner.metric

    @property
    def total_samples(self) -> int:
        return self.inner.total_samples

    def add_configurations(self, experiments: Any) -> None:
        self.inner.add_configurations(experiments)

    def has_checkpoint(self, dirpath: str) -> bool:
        return self.inner.has_checkpoint(dirpath)

    def save_to_dir(self, dirpath: str, **kwargs: Any) -> None:
        self.inner.save_to_dir(dirpath, **kwargs)
        state = {"trials": self.trials, "live": sorted(self.live), "reached": self.reached,
                 "refused": self.refused}  # fmt: skip
        path = os.path.join(dirpath, STATE_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            json.dump(state, file)
        os.replace(path + ".tmp", path)

    def restore_from_dir(self, dirpath: str) -> None:
        self.inner.restore_from_dir(dirpath)
        path = os.path.join(dirpath, STATE_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                state = json.load(file)
            self.trials, self.live = state["trials"], set(state["live"])
            self.reached, self.refused = state["reached"], state["refused"]


def budget_line(sweep: SweepConfig, client: MlflowClient, parent: str) -> str | None:
    """The summary's line: spent against the budget, and whether it stopped the launches."""
    if sweep.tune.budget is None:
        return None
    run = client.get_run(parent)
    spent = run.data.metrics.get(BUDGET_SPENT_METRIC, 0.0)
    state = run.data.tags.get(BUDGET_TAG, "within the budget")
    return f"budget: spent {spent:.4g} of {budget_limit(sweep):g} {budget_unit(sweep)} ({state})"


def spent_before(client: MlflowClient, parent: str) -> Before:
    """What the sweep run `parent` records of its budget: the latest spend and whether it was
    reached (the start of an experiment that `--accept-changes` added)."""
    history = client.get_metric_history(parent, BUDGET_SPENT_METRIC)
    last = max(history, key=lambda m: (m.step, m.timestamp), default=None)
    reached = client.get_run(parent).data.tags.get(BUDGET_TAG, "")
    return Before(last.value, last.step, reached) if last else Before(reached=reached)


def with_budget(
    search_alg: Any, sweep: SweepConfig, slots: int, tracking_uri: str, parent: str, main: bool
) -> tuple[Any, int | None]:
    """The search algorithm for the Tuner and its concurrency limit: `search_alg` (a Searcher,
    or None for the variant generator) and the sweep's limit, or with a budget what Tune would
    make of it within the budget, which bounds concurrency. An experiment that is not the
    sweep's `main` (trials `--accept-changes` added) goes on from what the sweep spent; where
    that reached the budget, it trains nothing and says so."""
    if sweep.tune.budget is None:
        return search_alg, sweep.tune.max_concurrent_trials
    from ray.tune.search import BasicVariantGenerator, SearchGenerator

    before = Before() if main else spent_before(MlflowClient(tracking_uri), parent)
    if before.reached:
        log.warning("--accept-changes: the trials added are not trained: the sweep's budget "
                    "was %s", before.reached)  # fmt: skip
    inner = BasicVariantGenerator() if search_alg is None else SearchGenerator(search_alg)
    return Budget(inner, sweep, slots, tracking_uri, parent, before), None
