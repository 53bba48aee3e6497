"""A sweep's time account: where its wall time went, and its efficiency, the share of the slot
time spent training (training seconds / (wall seconds x concurrent slots)).

The driver's stages (start-up, Ray start beside the pre-flight, cost stage, node checks, Tuner,
Ray stop, summary, report) come from its own clock; the trials' stages (setup, cost, evaluation, training) from their runs (TRIAL_TIMES and
`train_time_min`). The account goes to the sweep's run as `time/<key>` metrics, so that
`python -m segtune.bench sweep` and anyone later can read it back.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

TIME_PREFIX = "time/"
# the driver's stages, in the order they run on one machine (a cluster's cost stage comes after
# the node checks: it runs as Ray tasks)
DRIVER_STAGES = {
    "checks_s": "start-up",
    "start_s": "Ray start beside the pre-flight",
    "cost_stage_s": "cost stage",
    "nodes_s": "node checks and sweep run",
    "tuner_s": "trials",
    "stop_s": "Ray stop",
    "summary_s": "summary",
    "report_s": "report",
}


def account(
    trials: pd.DataFrame, phases: Mapping[str, float], slots: int, wall_s: float
) -> dict[str, float]:
    """The account of one sweep from its trial table (segtune.tracking.query) and the driver's
    stage seconds: every number in seconds but `slots` and `efficiency`."""

    def total(column: str, scale: float = 1.0) -> float:
        return float(trials[column].fillna(0).sum() * scale) if column in trials else 0.0

    busy = 0.0
    if not trials.empty:
        busy = (trials["end_time"] - trials["start_time"]).dt.total_seconds().fillna(0).sum()
    out = {key: float(phases.get(key, 0.0)) for key in DRIVER_STAGES}
    out.update(
        wall_s=wall_s,
        slots=float(slots),
        train_s=total("train_time_min", 60.0),
        setup_s=total("setup_s"),
        trial_cost_s=total("cost_s"),
        eval_s=total("eval_s"),
        # slot-seconds of the Tuner's stage in which no trial's run was open
        idle_s=max(0.0, out["tuner_s"] * slots - float(busy)),
    )
    out["efficiency"] = out["train_s"] / (wall_s * slots) if wall_s > 0 else 0.0
    return out


def log_account(client: MlflowClient, sweep_run_id: str, figures: Mapping[str, float]) -> None:
    client.log_batch(
        sweep_run_id,
        metrics=[Metric(TIME_PREFIX + k, float(v), 0, 0) for k, v in figures.items()],
    )


def read_account(client: MlflowClient, sweep_run_id: str) -> dict[str, float]:
    """The account a sweep's run holds (empty for a sweep run before segtune kept one)."""
    metrics = client.get_run(sweep_run_id).data.metrics
    return {k.removeprefix(TIME_PREFIX): v for k, v in metrics.items() if k.startswith(TIME_PREFIX)}


def account_lines(figures: Mapping[str, float]) -> list[str]:
    """The account in three lines: the efficiency, the driver's stages, the trials' stages."""
    slots = int(figures["slots"])
    head = (
        f"time: {figures['wall_s']:.1f} s wall x {slots} slot{'s' * (slots != 1)}; training "
        f"{figures['train_s']:.1f} s = {figures['efficiency']:.0%} of the slot time"
    )
    stages = ", ".join(f"{name} {figures.get(k, 0.0):.1f}" for k, name in DRIVER_STAGES.items())
    trials = ", ".join(
        f"{name} {figures.get(k, 0.0):.1f}"
        for k, name in (
            ("train_s", "training"),
            ("setup_s", "setup"),
            ("trial_cost_s", "cost"),
            ("eval_s", "evaluation"),
            ("idle_s", "idle"),
        )
    )
    return [head, f"  driver (s): {stages}", f"  trials (slot-seconds): {trials}"]
