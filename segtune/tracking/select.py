"""Choosing among a sweep's trials: Pareto fronts, constraints, and the best trial to export.

It works on the tables of `segtune.tracking.query`; `best_trial` also checks in MLflow that the
chosen trial has a checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segtune.config.constraints import Constraint, parse_constraints
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


# --- constraints ------------------------------------------------------------------------------


def within_constraints(
    df: pd.DataFrame, constraints: Sequence[Constraint], metric_columns: Sequence[str]
) -> pd.Series:
    """Trials meeting every constraint; a constraint on a metric no trial has is a ConfigError.
    Where a trial lacks the metric the constraint does not hold: unknown is not within it."""
    mask = pd.Series(True, index=df.index)
    for c in constraints:
        if c.column not in metric_columns:
            raise ConfigError(
                f"--constraints: no metric {c.column!r} in this sweep; metrics: "
                f"{', '.join(metric_columns)}"
            )
        values = pd.to_numeric(df[c.column], errors="coerce")
        mask &= values.notna() & c.holds(values)
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
    """Finished trials that have `metric` and meet the constraints, best first.

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
        finished = finished[within_constraints(finished, constraints, metric_columns)]
        if finished.empty:
            text = ",".join(str(c) for c in constraints)
            raise TrackingError(
                f"no finished trial of {where} is within the constraints {text!r}; relax "
                "--constraints"
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
    constraints: str | None = None,
    all_sweeps: bool = False,
) -> Source:
    """The best finished trial with a checkpoint (a trial stopped early by ASHA has none)."""
    data = load_sweep_data(experiment, tracking_uri, all_sweeps=all_sweeps, history_keys=())
    parsed = parse_constraints(constraints) if constraints else []
    where = f"experiment {experiment!r}" + (" (all sweeps)" if all_sweeps else " (newest sweep)")
    ranked = rank_trials(data.table, metric, mode, parsed, data.metric_columns, where)
    for rank, (_, row) in enumerate(ranked.iterrows(), 1):
        if has_checkpoint(client, row["run_id"]):
            selection = {
                "by": "best",
                "metric": metric,
                "mode": mode,
                "constraints": constraints,
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
