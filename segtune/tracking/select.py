"""Choosing among a sweep's trials: Pareto fronts, budgets, and the best trial to export.

It works on the tables of `segtune.tracking.query`; `best_trial` also checks in MLflow that the
chosen trial has a checkpoint.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segtune.config.names import CHECKPOINT_ARTIFACT, OBJECTIVE, ROLE_TAG, ROLE_TRIAL
from segtune.errors import ConfigError
from segtune.tracking.query import TrackingError, load_sweep_data

log = logging.getLogger(__name__)


def pareto_front(
    df: pd.DataFrame,
    objective: str = OBJECTIVE,
    costs: Sequence[str] | str = ("train_time_min",),
    modes: Mapping[str, str] | None = None,
) -> pd.Series:
    """True for the trials that no other trial dominates on `objective` and `costs`.

    `modes` maps a column to "max" or "min" (defaults: objective max, costs min). A trial
    dominates another when it is at least as good on every column and better on one; trials
    missing any of the columns are never on the front and never dominate.
    """
    costs = [costs] if isinstance(costs, str) else list(costs)
    columns = [objective, *costs]
    modes = {objective: "max", **{c: "min" for c in costs}, **(modes or {})}
    for column in columns:
        if modes[column] not in ("max", "min"):
            raise ConfigError(f"pareto_front: mode {modes[column]!r} of {column}: use max or min")
    mask = pd.Series(False, index=df.index)
    if any(c not in df.columns for c in columns):
        return mask
    values = df[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    complete = np.isfinite(values).all(axis=1)
    # as "higher is better" everywhere
    signs = np.array([1.0 if modes[c] == "max" else -1.0 for c in columns])
    v = values[complete] * signs
    at_least = (v[:, None, :] >= v[None, :, :]).all(axis=2)  # [i, j]: i at least as good as j
    better = (v[:, None, :] > v[None, :, :]).any(axis=2)
    dominated = (at_least & better).any(axis=0)
    mask[complete] = ~dominated
    return mask


# --- budgets ---------------------------------------------------------------------------------

_OPS: dict[str, Callable[[object, object], object]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_CONSTRAINT = re.compile(
    r"^\s*([A-Za-z_][\w.\-]*)\s*(<=|>=|<|>)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True)
class Constraint:
    column: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value:g}"

    def holds(self, df: pd.DataFrame) -> pd.Series:
        """Where the column is missing the constraint does not hold: unknown is not within budget."""
        values = pd.to_numeric(df[self.column], errors="coerce")
        return values.notna() & _OPS[self.op](values, self.value)


def parse_budget(text: str) -> list[Constraint]:
    """`"infer_ms_cpu<=50,size_mb<20"` to constraints; anything else is a ConfigError."""
    constraints = []
    for part in text.split(","):
        match = _CONSTRAINT.match(part)
        if not part.strip() or match is None:
            raise ConfigError(
                f"--budget {text!r}: cannot read {part.strip()!r}; expected comma-separated "
                "METRIC<=VALUE constraints (operators <=, <, >=, >), e.g. "
                "'infer_ms_cpu<=50,size_mb<20'"
            )
        try:
            value = float(match.group(3))
        except ValueError:
            raise ConfigError(f"--budget {text!r}: {match.group(3)!r} is not a number") from None
        constraints.append(Constraint(match.group(1), match.group(2), value))
    return constraints


def within_budget(
    df: pd.DataFrame, constraints: Sequence[Constraint], metric_columns: Sequence[str]
) -> pd.Series:
    """Trials meeting every constraint; a constraint on a metric no trial has is a ConfigError."""
    mask = pd.Series(True, index=df.index)
    for c in constraints:
        if c.column not in metric_columns:
            raise ConfigError(
                f"--budget: no metric {c.column!r} in this sweep; metrics: "
                f"{', '.join(metric_columns)}"
            )
        mask &= c.holds(df)
    return mask


# --- the best trial ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The trial run being exported and how it was chosen."""

    run: Run
    experiment: str
    selection: dict[str, Any]


def rank_trials(
    table: pd.DataFrame,
    metric: str = OBJECTIVE,
    mode: str = "max",
    constraints: Sequence[Constraint] = (),
    metric_columns: Sequence[str] | None = None,
    where: str = "this sweep",
) -> pd.DataFrame:
    """Finished trials that have `metric` and meet the budget, best first.

    Equal values go to the smaller model (`size_mb`; unknown sizes last), then the earlier trial.
    """
    if mode not in ("max", "min"):
        raise ConfigError(f"--mode {mode!r}: use max or min")
    done = table["status"] == "FINISHED"
    if not done.any():
        statuses = ", ".join(f"{n} {s}" for s, n in table["status"].value_counts().items())
        raise TrackingError(
            f"{where} has no finished trial ({statuses}); wait for the sweep to finish, or "
            "fix what the trials' segtune.error tags say and run it again"
        )
    metric_columns = list(metric_columns if metric_columns is not None else table.columns)
    if metric not in metric_columns:
        raise ConfigError(
            f"--metric {metric!r}: no trial of {where} has it; metrics: {', '.join(metric_columns)}"
        )
    values = pd.to_numeric(table[metric], errors="coerce")
    finished = table[done & values.notna()]
    if finished.empty:
        raise TrackingError(f"no finished trial of {where} has a value of {metric}")
    if constraints:
        finished = finished[within_budget(finished, constraints, metric_columns)]
        if finished.empty:
            budget = ",".join(str(c) for c in constraints)
            raise TrackingError(
                f"no finished trial of {where} is within the budget {budget!r}; relax --budget"
            )
    size = (
        pd.to_numeric(finished["size_mb"], errors="coerce")
        if "size_mb" in finished.columns
        else pd.Series(np.nan, index=finished.index)
    )
    ordered = finished.assign(_metric=values[finished.index], _size=size.fillna(math.inf))
    ordered = ordered.sort_values(
        ["_metric", "_size", "start_time"], ascending=[mode == "min", True, True], kind="stable"
    )
    return ordered.drop(columns=["_metric", "_size"])


def has_checkpoint(client: MlflowClient, run_id: str) -> bool:
    folder = CHECKPOINT_ARTIFACT.rsplit("/", 1)[0]
    return CHECKPOINT_ARTIFACT in {f.path for f in client.list_artifacts(run_id, folder)}


def best_trial(
    client: MlflowClient,
    experiment: str,
    tracking_uri: str,
    metric: str = OBJECTIVE,
    mode: str = "max",
    budget: str | None = None,
    all_sweeps: bool = False,
) -> Source:
    """The best finished trial with a checkpoint (a trial stopped early by ASHA has none)."""
    data = load_sweep_data(experiment, tracking_uri, all_sweeps=all_sweeps, history_keys=())
    constraints = parse_budget(budget) if budget else []
    where = f"experiment {experiment!r}" + (" (all sweeps)" if all_sweeps else " (newest sweep)")
    ranked = rank_trials(data.table, metric, mode, constraints, data.metric_columns, where)
    for rank, (_, row) in enumerate(ranked.iterrows(), 1):
        if has_checkpoint(client, row["run_id"]):
            selection = {
                "by": "best",
                "metric": metric,
                "mode": mode,
                "budget": budget,
                "rank": rank,
                "candidates": len(ranked),
                "trials": len(data.table),
                "sweeps": "all" if all_sweeps else "newest",
            }
            return Source(client.get_run(row["run_id"]), experiment, selection)
        log.warning(
            "trial %s (%s %s) has no %s (stopped early?); taking the next one",
            row["label"],
            metric,
            row[metric],
            CHECKPOINT_ARTIFACT,
        )
    raise TrackingError(f"none of the {len(ranked)} finished trials of {where} has a checkpoint")


def trial_by_id(client: MlflowClient, run_id: str, experiment: str | None) -> Source:
    """`--run-id`: a trial run picked by hand."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"--run-id {run_id}: no such MLflow run") from None
    name = client.get_experiment(run.info.experiment_id).name
    if experiment is not None and name != experiment:
        raise TrackingError(f"--run-id {run_id}: a run of experiment {name!r}, not {experiment!r}")
    if run.data.tags.get(ROLE_TAG) != ROLE_TRIAL:
        raise TrackingError(
            f"--run-id {run_id}: not a trial run (tag {ROLE_TAG}={ROLE_TRIAL}); pass the run of "
            "one trial, not of a sweep"
        )
    if not has_checkpoint(client, run_id):
        raise TrackingError(
            f"--run-id {run_id} ({run.info.run_name}, {run.info.status}): no "
            f"{CHECKPOINT_ARTIFACT}; the trial did not finish or was stopped early"
        )
    if run.info.status != "FINISHED":
        log.warning("run %s is %s, not FINISHED", run_id, run.info.status)
    return Source(run, name, {"by": "run-id"})
