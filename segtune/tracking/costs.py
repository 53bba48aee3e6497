"""The cost table: one MLflow run per measured architecture signature, in the experiment
`segtune-costs` of the sweep's own tracking store, so that every node and every later sweep
reads a model's cost instead of timing it again (docs/design.md, "Cost measurement").

A cost run holds the model costs as metrics and every condition of the measurement (input size,
threads, CPU and GPU names, spread, load, why it is noisy) as `segtune.cost.<key>` tags: the
same names a trial run carries once it has taken its cost from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from segtune.config.names import (
    COST_EXPERIMENT,
    COST_TAG_PREFIX,
    LABEL_TAG,
    MODEL_COSTS,
    ROLE_COST,
    ROLE_TAG,
)
from segtune.tracking.runs import experiment_id, finite_metrics

SIGNATURE_TAG = f"{COST_TAG_PREFIX}signature"
NOISY_TAG = f"{COST_TAG_PREFIX}noisy"
INT_CONDITIONS = ("bench_threads", "bench_warmup", "bench_repeats", "bench_gpu_repeats")
FLOAT_CONDITIONS = ("cpu_cv", "other_cores", "load_before", "load_after")


def record_cost(client: MlflowClient, signature: str, label: str, cost: Mapping[str, Any]) -> str:
    """A finished cost run for `signature`; returns its run id."""
    tags = {ROLE_TAG: ROLE_COST, LABEL_TAG: label, SIGNATURE_TAG: signature}
    tags.update({f"{COST_TAG_PREFIX}{k}": str(v) for k, v in cost.items() if k not in MODEL_COSTS})
    run = client.create_run(experiment_id(client, COST_EXPERIMENT), run_name=label, tags=tags)
    metrics = finite_metrics({k: v for k, v in cost.items() if k in MODEL_COSTS})
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def find_cost(client: MlflowClient, signature: str) -> tuple[str, dict[str, Any]] | None:
    """The latest steady cost run of `signature` (a noisy one only when no steady one exists):
    its run id and the cost, conditions included, as `segtune.models.cost.measure_cost` returns it."""
    experiment = client.get_experiment_by_name(COST_EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{SIGNATURE_TAG}` = '{signature}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    if not runs:
        return None
    run = next((r for r in runs if NOISY_TAG not in r.data.tags), runs[0])
    cost: dict[str, Any] = dict(run.data.metrics)
    for tag, value in run.data.tags.items():
        if tag.startswith(COST_TAG_PREFIX):
            key = tag.removeprefix(COST_TAG_PREFIX)
            cost[key] = (
                int(value)
                if key in INT_CONDITIONS
                else float(value)
                if key in FLOAT_CONDITIONS
                else value
            )
    return run.info.run_id, cost
