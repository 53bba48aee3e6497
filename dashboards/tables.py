"""A sweep's numbers as CSV, for a study's write-up: every trial, each configuration's mean and
spread over its seeds, the pairs of configurations against that spread, and the curves. Read
from MLflow only (`python -m dashboards.report --experiment E --csv DIR`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from dashboards.analysis import compare_configs, seed_groups
from segtune.classes import CLASS_NAMES
from segtune.config.names import BOUNDARY_METRIC, OBJECTIVE
from segtune.tracking.query import SweepData, metrics_at_step

log = logging.getLogger(__name__)

BEST_IOU = "best_iou_"  # a class's IoU at the trial's best epoch (its `val_iou_<class>` there)
# what varies from seed to seed: quality, and the training time
SEEDED_METRICS = (OBJECTIVE, BOUNDARY_METRIC, *(BEST_IOU + name for name in CLASS_NAMES),
                  "train_time_min")  # fmt: skip
# what a study compares configurations on: those, and the costs of the architecture, which are
# measured once per architecture (segtune.sweep.cost_stage), so have no spread over seeds
STUDY_METRICS = (
    *SEEDED_METRICS,
    "infer_ms_cpu",
    "infer_ms_gpu",
    "size_mb",
    "params_m",
    "gflops",
)
FILES = ("trials.csv", "configurations.csv", "comparisons.csv", "curves.csv")


def trials_with_best_ious(data: SweepData) -> pd.DataFrame:
    """The trial table with each class's IoU at the trial's best epoch (the latest
    `val_iou_<class>` is the last epoch's, not the best one's)."""
    table = data.table.copy()
    keys = [f"val_iou_{name}" for name in CLASS_NAMES]
    for index, row in table.iterrows():
        if pd.isna(row.get("best_epoch")):
            continue
        found = metrics_at_step(data.tracking_uri, row["run_id"], keys, int(row["best_epoch"]))
        for name in CLASS_NAMES:
            table.loc[index, BEST_IOU + name] = found.get(f"val_iou_{name}")
    return table


def configurations(trials: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and metric: seeds, mean, std, min, max and the run ids."""
    frames = []
    for metric in STUDY_METRICS:
        groups = seed_groups(trials, metric)
        if groups.empty:
            continue
        groups = groups.assign(metric=metric, runs=groups["runs"].map(" ".join))
        frames.append(groups[["label", "metric", "n", "mean", "std", "min", "max", "runs"]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def comparisons(trials: pd.DataFrame) -> pd.DataFrame:
    """Pairs of configurations with several seeds, per metric that varies with the seed: the
    difference of the means and whether it exceeds the two seed spreads (mean ± std bars that
    do not overlap)."""
    rows = []
    for metric in SEEDED_METRICS:
        for c in compare_configs(seed_groups(trials, metric)):
            rows.append({"metric": metric, "a": c.a, "b": c.b, "differs_in": c.differs_in,
                         "mean_a_minus_b": c.diff, "std_a": c.std_a, "std_b": c.std_b,
                         "beyond_spread": c.beyond_spread})  # fmt: skip
    return pd.DataFrame(rows)


def write_tables(data: SweepData, folder: Path) -> list[Path]:
    """Write FILES into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    trials = trials_with_best_ious(data)
    labels = trials.set_index("run_id")["label"]
    curves = data.histories.assign(label=data.histories["run_id"].map(labels))
    frames = (trials, configurations(trials), comparisons(trials), curves)
    paths = []
    for name, frame in zip(FILES, frames, strict=True):
        frame.to_csv(folder / name, index=False)
        paths.append(folder / name)
    log.info("%d trials as CSV in %s", len(trials), folder)
    return paths
