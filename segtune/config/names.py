"""The names of the MLflow contract (docs/design.md): tags, metric keys, artifact paths.

One list of each: the trainable writes these names, the driver, the dashboards and export read
them. No MLflow import here, so that configuration checks can use the metric names too.
"""

from __future__ import annotations

import math

from segtune.classes import CLASS_NAMES

# --- tags ------------------------------------------------------------------------------------
ROLE_TAG = "segtune.role"
ROLE_SWEEP, ROLE_TRIAL, ROLE_EXPORT, ROLE_COST = "sweep", "trial", "export", "cost"
TRIAL_ID_TAG = "ray.trial_id"
NODE_TAG = "segtune.node"  # where the run ran: `IP (hostname)`
WORKER_TAG = "segtune.worker"  # the process of the attempt: `pid N` (reused by the next trial)
ATTEMPTS_TAG = "segtune.attempts"  # 1, then one more each time a retry or resume reopens it
ERROR_TAG = "segtune.error"
STOPPED_TAG = "segtune.stopped"  # on a KILLED run: why and when it was stopped, how to resume
LABEL_TAG = "segtune.label"  # the trial's run name, seed included
CONFIG_LABEL_TAG = "segtune.config_label"  # the same without the seed: one name per configuration
SWEEP_TAG = "segtune.sweep"
DATASET_TAG = "segtune.dataset"  # on a sweep run: its dataset's fingerprint (warm starts match it)
# on a sweep run: the earlier trial runs a warm start reused, comma-separated ids
REUSED_TAG = "segtune.reused"
# on a sweep run with tune.budget: "reached: ..." once it stopped launching, else "within"
BUDGET_TAG = "segtune.budget"
BUDGET_SPENT_METRIC = "budget_spent"  # in the budget's unit (device-hours or trial-epochs)
# the experiment tag MLflow's UI (3.x) reads to open an experiment on its runs ("Model training")
# instead of its GenAI overview of traces
EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
EARLY_STOP_TAG = "segtune.early_stopped"  # the scheduler stopped the trial; value says when
SOURCE_RUN_TAG = "segtune.source_run_id"  # on an export run: the trial it exported
# the conditions a trial's cost was measured under (threads, CPU, input size...), one tag each
COST_TAG_PREFIX = "segtune.cost."
# the cost table (segtune.tracking.costs): one run per measured architecture signature
COST_EXPERIMENT = "segtune-costs"

# --- metrics ---------------------------------------------------------------------------------
# the per-epoch scores of the model: what a scheduler such as ASHA may compare trials on
EPOCH_SCORES = (
    "train_loss",
    "val_loss",
    "val_miou",
    "val_acc",
    "val_class_acc",
    *(f"val_iou_{name}" for name in CLASS_NAMES),
)
EPOCH_METRICS = (*EPOCH_SCORES, "lr", "epoch_time_s")
OBJECTIVE = "best_val_miou"  # what "best trial" means unless a command is told otherwise
# on the sweep run: the mIoU of the colour-only classifier on the sweep's validation split, the
# floor a model must beat to have learned more than colour (segtune.training.baseline)
FLOOR_METRIC = "floor_miou"
# the mIoU of the best weights over the pixels near a class boundary (segtune.training.metrics)
BOUNDARY_METRIC = "best_boundary_miou"
QUALITY_METRICS = (OBJECTIVE, "best_epoch", BOUNDARY_METRIC)
# the cost of the architecture, measured on the trained weights by segtune.models.cost; `infer_ms_gpu`
# is absent where no GPU measured it, never invented
MODEL_COSTS = ("params_m", "size_mb", "gflops", "infer_ms_cpu", "infer_ms_gpu")
TRAIN_COSTS = ("train_time_min", "train_img_s")  # the cost of training, from the epochs
COST_KEYS = (*MODEL_COSTS, *TRAIN_COSTS)
# where a trial's own wall time went besides training: data and model, the cost (a look-up in
# the cost table, or a timing), and the evaluation of the best weights with its artifacts
TRIAL_TIMES = ("setup_s", "cost_s", "eval_s")
FINAL_METRICS = (*QUALITY_METRICS, *COST_KEYS)
# what a trial reports to Ray Tune: each epoch's metrics, then the final ones; the names a
# sweep's `tune.metric` may take
REPORTED_METRICS = (*EPOCH_METRICS, *FINAL_METRICS)
# the study's quality-against-cost pictures (its Pictures 5, 6 and 7), one cost each
PARETO_COSTS = ("train_time_min", "infer_ms_gpu", "infer_ms_cpu")

# how tables title and format the final metrics, in the order they show them
COLUMNS: dict[str, tuple[str, str]] = {
    OBJECTIVE: ("mIoU", "{:.3f}"),
    "best_epoch": ("best epoch", "{:.0f}"),
    BOUNDARY_METRIC: ("boundary mIoU", "{:.3f}"),
    "train_time_min": ("train min", "{:.2f}"),
    "infer_ms_cpu": ("CPU ms", "{:.1f}"),
    "infer_ms_gpu": ("GPU ms", "{:.2f}"),
    "size_mb": ("MB", "{:.1f}"),
    "params_m": ("params M", "{:.2f}"),
    "gflops": ("GFLOPs", "{:.2f}"),
}

# --- artifacts -------------------------------------------------------------------------------
SWEEP_ARTIFACT = "sweep.yaml"
REPORT_DIR = "report"
CHECKPOINT_ARTIFACT = "checkpoints/best.pt"
EVAL_DIR = "eval"
PER_IMAGE_ARTIFACT = f"{EVAL_DIR}/per_image.csv"
CONFUSION_ARTIFACT = f"{EVAL_DIR}/confusion.csv"
EXAMPLES_DIR = f"{EVAL_DIR}/examples"


def format_metric(value: object, pattern: str = "{:.4g}", missing: str = "—") -> str:
    """A metric value for a table or a card: `pattern` for a number, `missing` for anything else
    (None, NaN, text)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return missing
    return missing if math.isnan(number) else pattern.format(number)
