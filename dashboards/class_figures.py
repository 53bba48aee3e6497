"""Per-class pictures of one trial: the row-normalised confusion matrix and IoU per class, in
the class palette."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dashboards.figures import save
from segtune.classes import CLASS_NAMES, PALETTE


def _class_color(name: str) -> tuple[float, float, float] | str:
    if name in CLASS_NAMES:
        return tuple(c / 255 for c in PALETTE[CLASS_NAMES.index(name)])
    return "tab:gray"


def confusion(matrix: pd.DataFrame, path: Path, title: str) -> None:
    """Row-normalised confusion matrix: each row (a ground-truth class) sums to 1."""
    values = matrix.to_numpy(dtype=float)
    sums = values.sum(axis=1, keepdims=True)
    norm = np.divide(values, sums, out=np.zeros_like(values), where=sums > 0)
    n = len(matrix)
    fig = Figure(figsize=(1.2 + 0.75 * n, 1.0 + 0.7 * n), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(n), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(n), matrix.index)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the ground-truth row")
    save(fig, path)


def iou_bars(iou: Mapping[str, float], path: Path, title: str) -> None:
    """IoU per class in the class palette (white grass gets a black edge)."""
    names = list(iou)
    fig = Figure(figsize=(1.5 + 0.7 * len(names), 4), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(
        names, [iou[n] for n in names], color=[_class_color(n) for n in names], edgecolor="black"
    )
    ax.bar_label(bars, [f"{iou[n]:.2f}" for n in names], padding=2, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("IoU")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    save(fig, path)
