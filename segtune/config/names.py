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
# the trial's architecture breaks the sweep's tune.constraints: it ended before its first epoch;
# the value says which constraint and by how much
INFEASIBLE_TAG = "segtune.infeasible"
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
# the loader's share of an epoch: the seconds the training step waited for its next batch,
# and those over the epoch's training time (validation excluded)
DATA_WAIT_METRICS = ("data_wait_s", "data_wait_frac")
EPOCH_METRICS = (*EPOCH_SCORES, "lr", "epoch_time_s", *DATA_WAIT_METRICS)
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
# the mean of the epochs' data_wait_frac: above INPUT_BOUND_FRAC the trial's loader held it back
DATA_WAIT_MEAN = "data_wait_frac_mean"
INPUT_BOUND_FRAC = 0.2
INPUT_BOUND_FIX = "more cpu per trial, data.cache, num_workers"
TRAIN_COSTS = (
    "train_time_min",
    "train_img_s",
    DATA_WAIT_MEAN,
)  # the cost of training, from the epochs
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
    DATA_WAIT_MEAN: ("data wait", "{:.0%}"),
}

# --- artifacts -------------------------------------------------------------------------------
SWEEP_ARTIFACT = "sweep.yaml"
# on the sweep run: the configurations its tune.constraints removed before the trials, and why
EXCLUDED_ARTIFACT = "excluded.json"
REPORT_DIR = "report"
CHECKPOINT_ARTIFACT = "checkpoints/best.pt"
EVAL_DIR = "eval"
PER_IMAGE_ARTIFACT = f"{EVAL_DIR}/per_image.csv"
CONFUSION_ARTIFACT = f"{EVAL_DIR}/confusion.csv"
EXAMPLES_DIR = f"{EVAL_DIR}/examples"


def input_bound(data_wait_frac_mean: object) -> bool:
    """Whether a trial waited for its data more than INPUT_BOUND_FRAC of its epochs (False
    where the figure is missing)."""
    try:
        return float(data_wait_frac_mean) > INPUT_BOUND_FRAC  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def format_metric(value: object, pattern: str = "{:.4g}", missing: str = "—") -> str:
    """A metric value for a table or a card: `pattern` for a number, `missing` for anything else
    (None, NaN, text)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return missing
    return missing if math.isnan(number) else pattern.format(number)
