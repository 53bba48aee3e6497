"""Writing the runs of the MLflow contract: the sweep's parent run and each trial's nested run.

Everything goes through `MlflowClient` with explicit run ids (no global "active run"), so a
trial on any Ray node writes to its own run, and a retried trial writes to the same run again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from segtune.config.names import (
    ATTEMPTS_TAG,
    CONFIG_LABEL_TAG,
    EPOCH_SCORES,
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    FINAL_METRICS,
    LABEL_TAG,
    MODEL_DEVELOPMENT,
    NODE_TAG,
    OBJECTIVE,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    STOPPED_TAG,
    SWEEP_ARTIFACT,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    WORKER_TAG,
)
from segtune.tracking.address import is_server, public_uri

log = logging.getLogger(__name__)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created when missing (as a model-development experiment,
    so that the MLflow UI opens on its runs)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})


def runs_page(tracking_uri: str, experiment_key: str, sweep_run_id: str | None = None) -> str:
    """Where a user sees the runs of experiment id `experiment_key`: its page on the tracking
    server, or for a file or database store the `mlflow ui` command and the page it serves.

    Sorted by OBJECTIVE, so that MLflow's UI lists the trials themselves, best first, not folded
    under their sweep's row (it nests children only when sorted by time); with `sweep_run_id`,
    only that sweep's trials. No link holds the URI's credentials: the browser asks for them."""
    query = {"orderByKey": f"metrics.`{OBJECTIVE}`", "orderByAsc": "false"}
    if sweep_run_id:
        query["searchFilter"] = f"tags.{MLFLOW_PARENT_RUN_ID} = '{sweep_run_id}'"
    view = f"#/experiments/{experiment_key}/runs?" + urllib.parse.urlencode(
        query, quote_via=urllib.parse.quote
    )
    shown = public_uri(tracking_uri)
    if is_server(tracking_uri):
        return f"{shown.rstrip('/')}/{view}"
    return f"mlflow ui --backend-store-uri {shown}, then http://127.0.0.1:5000/{view}"


def run_page(tracking_uri: str, experiment_key: str, run_id: str) -> str | None:
    """The page of one run on the tracking server; None for a file or database store, which
    has no page until `mlflow ui` serves it."""
    if not is_server(tracking_uri):
        return None
    return f"{public_uri(tracking_uri).rstrip('/')}/#/experiments/{experiment_key}/runs/{run_id}"


def start_sweep_run(
    client: MlflowClient,
    experiment: str,
    sweep_name: str,
    sweep_yaml: str,
    description: str = "",
    node: str | None = None,
    created: Callable[[str], None] | None = None,
) -> str:
    """The parent run of one sweep invocation, with the resolved sweep as `sweep.yaml`.

    `created` gets the run's id before its first artifact: an experiment whose artifact location
    cannot be written fails that upload, and the caller must know which run to close."""
    experiment_key = experiment_id(client, experiment)
    # an experiment made before segtune tagged its kind opens on MLflow's GenAI overview
    client.set_experiment_tag(experiment_key, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    run = client.create_run(
        experiment_key,
        run_name=f"{sweep_name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={
            ROLE_TAG: ROLE_SWEEP,
            SWEEP_TAG: sweep_name,
            NODE_TAG: node or socket.gethostname(),
            "mlflow.note.content": description,
        },
    )
    if created is not None:
        created(run.info.run_id)
    client.log_text(run.info.run_id, sweep_yaml, SWEEP_ARTIFACT)
    return run.info.run_id


def close_open_runs(
    client: MlflowClient, experiment: str, parents: list[str], reason: str
) -> list[str]:
    """Mark KILLED, with `reason` as `segtune.stopped`, every run still RUNNING among the sweep
    runs `parents` and their trials; the ids it closed.

    A driver that was interrupted calls it for its own sweep run; a driver that starts, holding
    the sweep's lock, for the sweep run its run storage names last (no driver of it is live).
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    ids = [found.experiment_id]
    closed: list[str] = []
    for parent in parents:
        trials = client.search_runs(
            ids, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and attributes.status = 'RUNNING'"
        )
        for run_id in [run.info.run_id for run in trials] + [parent]:
            if client.get_run(run_id).info.status != "RUNNING":
                continue
            client.set_tag(run_id, STOPPED_TAG, reason)
            client.set_terminated(run_id, "KILLED")
            closed.append(run_id)
    return closed


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """MLflow stores NaN, but plots and comparisons choke on it: absent means unknown."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def run_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as a trial's run holds them (strings, cut to MLflow's limit): a warm start
    compares a configuration with earlier runs in this form."""
    return {k: str(v)[:6000] for k, v in params.items()}


def find_trial_run(
    client: MlflowClient, experiment: str, parent_run_id: str, trial_id: str
) -> Run | None:
    """The run of Ray trial `trial_id` in sweep `parent_run_id`, if one was created."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=(
            f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and "
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
        ),
        max_results=1,
    )
    return runs[0] if runs else None


def finished_metrics(client: MlflowClient, run_id: str) -> dict[str, float] | None:
    """The final metrics of run `run_id` if it has ended FINISHED (trained to its end, or
    stopped early by a scheduler), else None: a trial whose run finished is never run again."""
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        return None
    return {k: v for k, v in run.data.metrics.items() if k in (*EPOCH_SCORES, *FINAL_METRICS)}


SYSTEM_METRICS_INTERVAL_S = 5.0


class TrialRun:
    """The nested MLflow run of one trial; reopening it by id continues the same run."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        # steps already recorded, so an epoch re-run after a crash is not logged twice
        self.logged_steps = {m.step for m in client.get_metric_history(run_id, "train_loss")}

    @classmethod
    def open(
        cls,
        client: MlflowClient,
        *,
        experiment: str,
        parent_run_id: str | None,
        label: str,
        config_label: str,
        trial_id: str,
        params: Mapping[str, Any],
        run_id: str | None = None,
        node: str | None = None,
    ) -> TrialRun:
        """Create the trial's run, or reopen `run_id` (a retried or resumed trial).

        `config_label` names the configuration: the label without the seed of a repeat;
        `node` where this attempt runs (default: the host name).
        """
        node = node or socket.gethostname()
        if run_id is not None:
            attempts = client.get_run(run_id).data.tags.get(ATTEMPTS_TAG, "1")
            client.update_run(run_id, status="RUNNING")
            if STOPPED_TAG in client.get_run(run_id).data.tags:  # it goes on: no longer stopped
                client.delete_tag(run_id, STOPPED_TAG)
            client.log_batch(
                run_id,
                tags=[
                    RunTag(NODE_TAG, node),
                    RunTag(WORKER_TAG, f"pid {os.getpid()}"),
                    RunTag(ATTEMPTS_TAG, str(int(attempts) + 1)),
                ],
            )
            log.info("continuing MLflow run %s for trial %s on %s", run_id, trial_id, node)
            return cls(client, run_id)
        tags = {
            ROLE_TAG: ROLE_TRIAL,
            TRIAL_ID_TAG: trial_id,
            NODE_TAG: node,
            WORKER_TAG: f"pid {os.getpid()}",
            ATTEMPTS_TAG: "1",
            LABEL_TAG: label,
            CONFIG_LABEL_TAG: config_label,
        }
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = client.create_run(experiment_id(client, experiment), run_name=label, tags=tags)
        client.log_batch(
            run.info.run_id,
            params=[Param(k, v) for k, v in sorted(run_params(params).items())],
        )
        return cls(client, run.info.run_id)

    @contextlib.contextmanager
    def system_metrics(self, resumed: bool = False) -> Iterator[None]:
        """MLflow's own system-metrics monitor on this run while the block runs: CPU %, memory,
        and GPU utilisation and memory where NVML finds a GPU, every SYSTEM_METRICS_INTERVAL_S
        (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides), so the UI shows whether a trial
        starved. A resumed attempt continues the steps; a block shorter than the interval
        still logs the sample the monitor took."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=SYSTEM_METRICS_INTERVAL_S,
            resume_logging=resumed,
            tracking_uri=self.client.tracking_uri,
        )
        first_step = monitor._logging_step
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()  # before the run is closed: its loop stops on a closed run
            if monitor._logging_step == first_step:  # it had no full interval to log
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Per-epoch metrics with `step` = epoch, once per epoch."""
        if epoch in self.logged_steps:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, epoch) for k, v in finite_metrics(metrics).items()]
        self.client.log_batch(self.run_id, metrics=batch)
        self.logged_steps.add(epoch)

    def log_final(self, metrics: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, v, now, 0) for k, v in finite_metrics(metrics).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, error: BaseException | str | None = None) -> None:
        """FINISHED (an earlier attempt's error tag removed), or FAILED with the error as
        `segtune.error`."""
        if error is not None:
            message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            self.client.set_tag(self.run_id, ERROR_TAG, message[:5000])
            self.client.set_terminated(self.run_id, status="FAILED")
            return
        if ERROR_TAG in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, ERROR_TAG)
        self.client.set_terminated(self.run_id, status="FINISHED")
