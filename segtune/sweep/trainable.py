"""The Ray Tune trainable: one trial, on any node, from data to MLflow.

It wires the stages together: resolve the trial configuration, build data and model, `fit()`
with a callback that logs each epoch to the trial's MLflow run and reports it to Ray with a
checkpoint, then evaluate the best weights and measure their cost. The MLflow run id travels
in the checkpoint (and the run carries the Ray trial id), so a retried or resumed trial keeps
writing to its own run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient
from ray import tune

from segtune.config.constraints import broken
from segtune.config.names import (
    BOUNDARY_METRIC,
    CHECKPOINT_ARTIFACT,
    COST_TAG_PREFIX,
    EVAL_DIR,
    INFEASIBLE_TAG,
    MODEL_COSTS,
)
from segtune.config.sweep import SweepConfig
from segtune.config.trial import TrialConfig
from segtune.data.pipeline import Scan
from segtune.models import build_model
from segtune.models.checkpoint import atomic_save, best_checkpoint, load_dict
from segtune.models.cost import Cost
from segtune.models.device import amp_dtype, resolve_device
from segtune.sweep.cost_stage import trial_cost
from segtune.sweep.feasible import architecture_costs, infeasible_result
from segtune.sweep.node_checks import node_name
from segtune.sweep.restore import write_marker
from segtune.sweep.space import resolve_trial
from segtune.tracking.runs import TrialRun, find_trial_run, finished_metrics
from segtune.training.engine import EpochEnd, fit
from segtune.training.evaluation import evaluate_best
from segtune.training.prepare import prepare

log = logging.getLogger(__name__)

TRAINING_STATE_FILE = "state.pt"  # fit()'s full state, in each epoch's Ray checkpoint
FINAL_RESULT_FILE = "final.json"  # the last checkpoint of a finished trial
# Test hook: make every trial die once after this epoch (the marker file says it happened).
FAULT_EPOCH_ENV, FAULT_MARKER_ENV = "SEGTUNE_FAULT_AFTER_EPOCH", "SEGTUNE_FAULT_MARKER"


def _maybe_fail(epoch: int) -> None:
    after = os.environ.get(FAULT_EPOCH_ENV)
    marker = os.environ.get(FAULT_MARKER_ENV)
    if after is None or marker is None or epoch != int(after):
        return
    path = Path(marker) / tune.get_context().get_trial_id()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        raise RuntimeError(f"injected fault after epoch {epoch} ({FAULT_EPOCH_ENV})")


def run_trial(
    config: dict[str, Any],
    *,
    sweep: SweepConfig,
    parent_run_id: str,
    tracking_uri: str,
    scan: Scan | None = None,
    measured: dict[str, str] | None = None,
) -> None:
    """Ray Tune function trainable for one trial of `sweep`: `scan` is the driver's check of the
    dataset, `measured` the signatures its cost stage timed (segtune.sweep.cost_stage)."""
    started = time.perf_counter()
    # Ray's line per saved checkpoint, each epoch of each trial, says nothing a user acts on
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = resolve_trial(sweep, config)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    resources = context.get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    device = resolve_device("cuda" if resources.get("GPU", 0) > 0 else "cpu")

    resume: dict[str, Any] | None = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            done = Path(folder) / FINAL_RESULT_FILE
            if done.is_file():  # finished before the driver died: report it again, run nothing
                tune.report(json.loads(done.read_text()))
                return
            resume = load_dict(Path(folder) / TRAINING_STATE_FILE, "Ray checkpoint")
    client = MlflowClient(tracking_uri)
    run_id = (resume or {}).get("mlflow_run_id")
    if run_id is None:  # a previous attempt may have died before its first checkpoint
        earlier = find_trial_run(client, sweep.experiment, parent_run_id, trial_id)
        run_id = earlier.info.run_id if earlier else None
    if run_id is not None and (final := finished_metrics(client, run_id)) is not None:
        # Ray's saved state is older than the trial's end (it is uploaded in the background), so
        # a resumed sweep restarts it from its last epoch: its run has finished, run nothing
        log.info("trial %s already finished in MLflow run %s", trial_id, run_id)
        if INFEASIBLE_TAG in client.get_run(run_id).data.tags:  # it ended before training
            _report_final(infeasible_result(sweep, architecture_costs(final)), 0)
        else:
            _report_final(final, cfg.epochs)
        return
    run = TrialRun.open(
        client,
        experiment=sweep.experiment,
        parent_run_id=parent_run_id,
        label=sweep.trial_label(cfg),
        config_label=sweep.config_label(cfg),
        trial_id=trial_id,
        params=cfg.model_dump(mode="json"),
        run_id=run_id,
        node=node_name(),
    )
    try:
        with run.system_metrics(resumed=resume is not None):
            cost_started = time.perf_counter()
            # known before the first epoch, so that every result carries the costs
            cost = trial_cost(
                build_model(cfg.model_copy(update={"pretrained": "none"})),
                sweep.bench,
                device,
                tracking_uri,
                measured or {},
                gpu_shared=resources.get("GPU", 0) < 1,
            )
            times = {"cost_s": time.perf_counter() - cost_started}
            reasons = broken(sweep.tune.constraint_list(), architecture_costs(cost))
            if reasons:  # never trained: its costs and why, and one result for the searcher
                final, epochs = _infeasible(sweep, run, cost, reasons, times), 0
            else:
                final = _train_evaluate_bench(
                    sweep, cfg, run, device, resume, scan, cost, times, started
                )
                epochs = cfg.epochs
    except SystemExit:  # Ray stopping the trial (a scheduler's decision): the driver closes the run
        raise
    except BaseException as exc:
        run.finish(exc)
        raise
    run.finish()  # before the last report: a scheduler may stop the trial right there
    _report_final(final, epochs)


def _cost_tags(cost: Cost) -> dict[str, Any]:
    """How and where the cost was measured, one tag each (segtune.config.names.COST_TAG_PREFIX)."""
    return {f"{COST_TAG_PREFIX}{k}": v for k, v in cost.items() if k not in MODEL_COSTS}


def _infeasible(
    sweep: SweepConfig, run: TrialRun, cost: Cost, reasons: list[str], times: dict[str, float]
) -> dict[str, Any]:
    """Close the books of a trial whose architecture breaks tune.constraints: its run keeps the
    costs, tagged with why; its one result carries them to the searcher."""
    costs = architecture_costs(cost)
    run.log_final({**costs, **times}, {**_cost_tags(cost), INFEASIBLE_TAG: "; ".join(reasons)})
    log.info("%s: not trained, %s", run.run_id, "; ".join(reasons))
    return infeasible_result(sweep, costs)


def _report_final(final: dict[str, Any], epochs: int) -> None:
    """Report the trial's final result with itself as the last checkpoint: a sweep resumed from
    an experiment state saved before this trial's end does not evaluate it again. It comes
    after the `epochs` reports of the epochs (its marker's count of Ray's results)."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / FINAL_RESULT_FILE).write_text(json.dumps(final))
        write_marker(Path(folder), epochs + 1, final)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(folder))


def _train_evaluate_bench(
    sweep: SweepConfig,
    cfg: TrialConfig,
    run: TrialRun,
    device: torch.device,
    resume: dict[str, Any] | None,
    scan: Scan | None,
    cost: Cost,
    times: dict[str, float],
    started: float,
) -> dict[str, Any]:
    """Train, evaluate and log with the architecture's `cost`; returns the final result for Ray.
    The time of each stage goes to the run as well (TRIAL_TIMES), for the sweep's time account."""
    data, model, loss_fn = prepare(sweep.data, cfg, progress=False, scan=scan)
    times["setup_s"] = time.perf_counter() - started - times["cost_s"]
    costs = architecture_costs(cost)

    def report(event: EpochEnd) -> None:
        run.log_epoch(event.epoch, event.metrics)
        # the summary so far travels with each result: a trial that a scheduler stops early is
        # closed by the driver with it (sweep.CloseRuns); the costs too, for the searcher
        reported = {**event.metrics, **event.summary, **costs}
        with tempfile.TemporaryDirectory() as folder:
            state = {**event.build_state(), "mlflow_run_id": run.run_id}
            atomic_save(state, Path(folder) / TRAINING_STATE_FILE)
            # last: a folder Ray copied in part does not match it (segtune.sweep.restore); one
            # result per epoch, so Ray's count of results is the epoch's number plus one
            write_marker(Path(folder), event.epoch + 1, reported)
            tune.report(reported, checkpoint=tune.Checkpoint.from_directory(folder))
        _maybe_fail(event.epoch)

    result = fit(
        model,
        data.train_loader,
        data.val_loader,
        cfg,
        loss_fn,
        device=device,
        callbacks=[report],
        resume=resume,
    )
    history = result.history
    best = history[result.best_epoch]
    final: dict[str, Any] = result.summary()

    model.load_state_dict(result.best_state_dict)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        folder_path = Path(folder)
        scores = evaluate_best(
            model,
            data.val,
            folder_path / EVAL_DIR,
            device,
            amp_dtype(cfg.amp, device),
            cfg.batch_size,
        )
        final.update(costs)
        final[BOUNDARY_METRIC] = scores["boundary_miou"]
        atomic_save(
            best_checkpoint(result.best_state_dict, cfg, {**best, **final}),
            folder_path / CHECKPOINT_ARTIFACT,
        )
        checkpoints = CHECKPOINT_ARTIFACT.rsplit("/", 1)[0]
        run.log_artifact(folder_path / checkpoints, checkpoints)
        run.log_artifact(folder_path / EVAL_DIR, EVAL_DIR)
    times["eval_s"] = time.perf_counter() - started
    run.log_final({**final, **times}, _cost_tags(cost))
    log.info("%s: evaluation took %.1f s, cost %.1f s (%s)", cfg.label(), times["eval_s"],
             times["cost_s"], cost.get("source"))  # fmt: skip
    return {**history[-1], **final}
