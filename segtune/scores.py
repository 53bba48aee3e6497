"""Scores of confusion matrices in numpy alone: the IoU of each class and the NaN-skipping mean.

The conventions are those of segtune.metrics (which counts the pixels with torch); the report
reads logged confusion matrices with these and so never imports torch.
"""

from __future__ import annotations

import numpy as np


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """IoU of each class from confusion matrices (..., C, C), rows = truth; NaN where undefined."""
    m = np.asarray(matrix, dtype=np.float64)  # read only, so pandas' read-only arrays do too
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    union = m.sum(-1) + m.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis skipping NaN; NaN (without numpy's warning) where all are NaN."""
    defined = ~np.isnan(values)
    count = defined.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(defined, values, 0.0).sum(-1) / count, np.nan)
