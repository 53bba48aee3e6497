"""A sweep's `tune.constraints` before training: which configurations the cost stage's costs
rule out (left out of a grid or a random sweep's draws, listed on the sweep run), and the one
result of a trial whose architecture breaks them, which ends before its first epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from segtune.config.constraints import Constraint, broken
from segtune.config.names import ERROR_TAG, MODEL_COSTS
from segtune.config.sweep import SweepConfig
from segtune.config.trial import TrialConfig
from segtune.errors import ConfigError
from segtune.models.cost import Cost
from segtune.sweep.cost_stage import model_key
from segtune.tracking.excluded import log_excluded

INFEASIBLE_KEY = "infeasible"  # true in the one result of a trial that breaks the constraints


def architecture_costs(cost: Mapping[str, Any]) -> dict[str, float]:
    """The costs of an architecture known before training (MODEL_COSTS) that `cost` holds."""
    return {k: float(cost[k]) for k in MODEL_COSTS if k in cost}


@dataclass(frozen=True)
class Feasibility:
    """The constraints against the cost stage's costs (by `model_key`). A configuration whose
    cost is unknown here, or lacks a constrained key, is kept: its trial checks its own cost."""

    constraints: Sequence[Constraint]
    costs: Mapping[tuple[Any, ...], Cost]

    def reasons(self, cfg: TrialConfig) -> list[str]:
        costs = architecture_costs(self.costs.get(model_key(cfg), {}))
        return broken([c for c in self.constraints if c.column in costs], costs)

    def keep(self, cfg: TrialConfig) -> bool:
        return not self.reasons(cfg)

    def excluded(self, sweep: SweepConfig, configs: Sequence[TrialConfig]) -> list[dict[str, str]]:
        """Each configuration ruled out, once, by its label, with why."""
        found: dict[str, str] = {}
        for cfg in configs:
            if reasons := self.reasons(cfg):
                found.setdefault(sweep.config_label(cfg), "; ".join(reasons))
        return [{"label": label, "reason": reason} for label, reason in found.items()]


def exclude(
    sweep: SweepConfig,
    configs: Sequence[TrialConfig],
    costs: Mapping[tuple[Any, ...], Cost],
    client: MlflowClient,
    parent: str,
) -> int:
    """The configurations of a grid or a random sweep that break tune.constraints (left out of
    its space by `segtune.sweep.space.param_space`), kept on the sweep run `parent`; returns how
    many of `configs` they are. None left (Optuna's too): the sweep run fails with one line.
    Optuna's are not left out: its sampler learns the constraints from the trials."""
    excluded = Feasibility(sweep.tune.constraint_list(), costs).excluded(sweep, configs)
    if not excluded:
        return 0
    labels = {e["label"] for e in excluded}
    removed = sum(1 for cfg in configs if sweep.config_label(cfg) in labels)
    if removed == len(configs):
        message = (
            f"tune.constraints: every configuration of the sweep breaks them ({len(labels)}; "
            f"e.g. {excluded[0]['label']}: {excluded[0]['reason']}); relax them"
        )
        client.set_tag(parent, ERROR_TAG, message)
        client.set_terminated(parent, "FAILED")
        raise ConfigError(message)
    if sweep.tune.search == "optuna":
        return 0
    log_excluded(client, parent, excluded)
    return removed


def infeasible_result(sweep: SweepConfig, costs: Mapping[str, float]) -> dict[str, Any]:
    """The one result of a trial that breaks the constraints: its costs, and the worst value of
    every objective it has no value of (Ray wants each objective in a result; Optuna's samplers
    rank an infeasible trial by its constraint values, not by these)."""
    worst = {m: -math.inf if mode == "max" else math.inf for m, mode in sweep.objectives()}
    return {**worst, **costs, INFEASIBLE_KEY: True}
