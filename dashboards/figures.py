"""The study's pictures, redrawn for any sweep with matplotlib's object API (Agg, no pyplot state).

Each function writes one PNG and says which trials it drew, with a note where it left some
out or had nothing honest to draw.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from dashboards.analysis import ema, smoothing_points
from dashboards.labels import place_labels
from segtune.config.names import OBJECTIVE
from segtune.tracking.query import SweepData
from segtune.tracking.select import pareto_front

log = logging.getLogger(__name__)

DPI = 120
MAX_LINES = 20  # more curves than this on one axis is noise: the best ones are drawn
MAX_TEXT_LABELS = 15  # beyond this, points carry numbers and a key lists the names
LOG_RANGE = 20.0  # a cost axis spanning more than this factor is drawn in log scale
MAX_BUBBLE = 1400.0  # marker area (pt^2) of the largest model

TITLES = {
    "train_loss": "Training loss",
    "val_loss": "Validation loss",
    "val_miou": "Validation mIoU",
    "best_val_miou": "best val mIoU",
    "train_time_min": "train time (min)",
    "infer_ms_gpu": "GPU inference (ms / image)",
    "infer_ms_cpu": "CPU inference (ms / image)",
    "size_mb": "model size (MB)",
}


@dataclass
class Drawn:
    labels: list[str] = field(default_factory=list)  # the trials in the picture
    note: str | None = None


def trial_colors(labels: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One colour per trial, the same in every figure."""
    if len(labels) > 20:  # beyond tab20, distinct hues from a continuous map
        cmap = matplotlib.colormaps["turbo"]
        return {
            label: cmap(x)
            for label, x in zip(labels, np.linspace(0.05, 0.95, len(labels)), strict=True)
        }
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i) for i, label in enumerate(labels)}


def numeric(table: pd.DataFrame, column: str) -> pd.Series:
    """A column as floats; all NaN when no trial logged it."""
    if column not in table.columns:
        return pd.Series(np.nan, index=table.index)
    return pd.to_numeric(table[column], errors="coerce")


def save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.2, facecolor="white")
    log.debug("wrote %s", path)
    return path


def _top(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The n best trials by the objective (trials without it last), in their original order."""
    if len(table) <= n:
        return table
    order = numeric(table, OBJECTIVE).fillna(-np.inf)
    return table.loc[order.sort_values(ascending=False).index[:n]].sort_index()


def _legend(fig: Figure) -> None:
    """Outside the axes: curves fill the whole plot, a legend inside would hide some."""
    fig.legend(loc="outside right upper", fontsize="small", frameon=False)


def curves(
    data: SweepData,
    trials: pd.DataFrame,
    key: str,
    colors: Mapping[str, tuple[float, ...]],
    weight: float,
    path: Path,
) -> Drawn:
    """One line per trial: raw values faint, EMA-smoothed bold (the study's Pictures 1-4)."""
    drawn = _top(trials, MAX_LINES)
    series = [(row["label"], data.history(row["run_id"], key)) for _, row in drawn.iterrows()]
    series = [(label, s) for label, s in series if len(s)]
    if not series:
        return Drawn(note=f"no trial logged `{key}`: no curve drawn")
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    if key.endswith("loss"):  # an early validation loss of thousands would flatten the rest
        _log_if_wide(ax, np.concatenate([s.to_numpy() for _, s in series]), axis="y")
    log = ax.get_yscale() == "log"  # the smoothing is done in the scale the eye reads
    shortest = min(len(s) for _, s in series)
    smoothed = weight > 0 and shortest >= smoothing_points(weight)
    for label, s in series:
        if smoothed:
            ax.plot(s.index, s.to_numpy(), color=colors[label], alpha=0.25, lw=1)
            line = ema(s.to_numpy(), weight, log=log)
            ax.plot(s.index, line, color=colors[label], lw=2.2, label=label)
        else:
            ax.plot(s.index, s.to_numpy(), color=colors[label], lw=1.8, marker="o", ms=3,
                    label=label)  # fmt: skip
    how = f"EMA {weight:g}{' of the logarithm' if log else ''} bold, raw faint"
    ax.set_title(f"{TITLES.get(key, key)} by epoch ({how if smoothed else 'raw values'})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(key + (" (log scale)" if ax.get_yscale() == "log" else ""))
    if key == "val_miou":
        _floor_line(ax, drawn)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend(fig)
    save(fig, path)
    notes = []
    if len(trials) > len(drawn):
        notes.append(f"`{key}`: the {len(drawn)} best of {len(trials)} trials are drawn")
    if weight > 0 and not smoothed:
        notes.append(
            f"`{key}`: {shortest} epochs are too few to smooth (EMA {weight:g} needs "
            f"{smoothing_points(weight)}): raw values drawn"
        )
    return Drawn([label for label, _ in series], "; ".join(notes) or None)


def _floor_line(ax: Axes, trials: pd.DataFrame, axis: str = "y") -> None:
    """The sweep's colour-only floor (`floor_miou`) as a labelled line on an mIoU axis: a point
    below it learned no more than colour."""
    if "floor_miou" not in trials:
        return
    for floor in sorted(pd.to_numeric(trials["floor_miou"], errors="coerce").dropna().unique()):
        text = f"colour-only floor {floor:.3f}"
        style = {"color": "0.35", "ls": ":", "lw": 1.4, "zorder": 1}
        if axis == "y":
            ax.axhline(floor, **style)
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(lo, floor - 0.02), max(hi, floor + 0.02))
            ax.annotate(text, (0.005, floor), xycoords=("axes fraction", "data"), ha="left",
                        va="top", fontsize=8, color="0.3", xytext=(0, -2),
                        textcoords="offset points")  # fmt: skip
        else:
            ax.axvline(floor, **style)
            lo, hi = ax.get_xlim()
            ax.set_xlim(min(lo, floor - 0.02), max(hi, floor + 0.02))
            ax.annotate(text, (floor, 0.995), xycoords=("data", "axes fraction"), ha="left",
                        va="top", fontsize=8, color="0.3", rotation=90)  # fmt: skip


def _log_if_wide(ax: Axes, values: np.ndarray, axis: str = "x") -> None:
    positive = values[values > 0]
    if len(positive) == len(values) and positive.max() / positive.min() > LOG_RANGE:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def pareto(
    trials: pd.DataFrame,
    cost: str,
    colors: Mapping[str, tuple[float, ...]],
    path: Path,
    objective: str = OBJECTIVE,
) -> Drawn:
    """Objective against one cost, bubble area proportional to size, front drawn (Pictures 5-7)."""
    if cost not in trials.columns or trials[cost].isna().all():
        return Drawn(
            note=f"no trial has `{cost}` (e.g. GPU latency on a CPU-only sweep): "
            f"no {objective} vs {cost} plot"
        )
    usable = trials.dropna(subset=[objective, cost])
    note = None
    if len(usable) < len(trials):
        missing = ", ".join(trials.loc[~trials.index.isin(usable.index), "label"])
        note = f"{objective} vs {cost}: left out for want of a value: {missing}"
    if usable.empty:
        return Drawn(note=note)
    x = usable[cost].to_numpy(dtype=float)
    y = usable[objective].to_numpy(dtype=float)
    sizes = numeric(usable, "size_mb")
    scale = MAX_BUBBLE / sizes.max() if sizes.notna().any() and sizes.max() > 0 else 0.0
    areas = (sizes.fillna(0) * scale).to_numpy() if scale else np.full(len(usable), 120.0)
    front = pareto_front(usable, objective, [cost]).to_numpy()

    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.add_subplot()
    point_colors = [colors[label] for label in usable["label"]]
    ax.scatter(x, y, s=areas, c=point_colors, alpha=0.45, edgecolors="none")
    ax.scatter(x, y, s=14, c=point_colors, zorder=3)
    ax.scatter(
        x[front], y[front], s=areas[front] + 60, facecolors="none", edgecolors="black", lw=1.6
    )
    order = np.argsort(x[front])
    ax.step(x[front][order], y[front][order], where="post", color="black", lw=1, ls="--")
    _log_if_wide(ax, x)
    ax.margins(x=0.12, y=0.15)
    if objective == OBJECTIVE:
        _floor_line(ax, usable)
    ax.grid(alpha=0.3)
    ax.set_xlabel(TITLES.get(cost, cost) + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(TITLES.get(objective, objective))
    ax.set_title(f"{TITLES.get(objective, objective)} vs {TITLES.get(cost, cost)}")

    numbered = len(usable) > MAX_TEXT_LABELS
    texts = [str(i + 1) if numbered else label for i, label in enumerate(usable["label"])]
    annotations = [
        ax.annotate(
            text,
            (xi, yi),
            xytext=(6, 2),
            textcoords="offset points",
            fontsize=8,
            fontweight="bold" if on_front else "normal",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.75, "ec": "none"},
            arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 0},
        )
        for text, xi, yi, on_front in zip(texts, x, y, front, strict=True)
    ]
    for ann in annotations:
        ann.set_in_layout(False)

    handles = [Line2D([], [], color="black", ls="--", lw=1, label="Pareto front")]
    handles.append(
        Line2D([], [], marker="o", ls="", mfc="none", mec="black", ms=10, label="on the front")
    )
    if scale:
        for ref in _nice_sizes(sizes.dropna().to_numpy()):
            handles.append(
                Line2D(
                    [],
                    [],
                    marker="o",
                    ls="",
                    color="0.6",
                    alpha=0.5,
                    ms=np.sqrt(ref * scale),
                    label=f"{ref:g} MB",
                )
            )
    fig.legend(
        handles=handles,
        loc="outside right upper",
        fontsize="small",
        frameon=False,
        title="bubble area ∝ size" if scale else None,
        labelspacing=1.8,
        handlelength=4,
        handletextpad=1.2,
    )
    if numbered:  # the key to the numbers, under the size legend
        fig.legend(
            handles=[
                Line2D([], [], ls="", label=f"{t}: {label}")
                for t, label in zip(texts, usable["label"], strict=True)
            ],
            loc="outside right lower",
            fontsize="x-small",
            frameon=False,
            handlelength=0,
            handletextpad=0,
        )
    place_labels(fig, ax, annotations, np.sqrt(areas) / 2)
    save(fig, path)
    return Drawn(list(usable["label"]), note)


def _nice_sizes(sizes: np.ndarray) -> list[float]:
    """Two or three round reference sizes spanning the models' sizes."""
    refs = []
    for value in (sizes.min(), np.median(sizes), sizes.max()):
        nice = float(f"{value:.1g}") if value > 0 else 0.0
        if nice > 0 and nice not in refs:
            refs.append(nice)
    return refs


def size_bars(trials: pd.DataFrame, colors: Mapping[str, tuple[float, ...]], path: Path) -> Drawn:
    """Model size per configuration (seeds share a size): the study's Picture 8."""
    if "size_mb" not in trials.columns or trials["size_mb"].isna().all():
        return Drawn(note="no trial has `size_mb`: no size chart")
    rows = trials.dropna(subset=["size_mb"]).drop_duplicates("config").sort_values("size_mb")
    fig = Figure(figsize=(8, 0.8 + 0.38 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh(
        rows["config_label"],
        rows["size_mb"],
        color=[colors[label] for label in rows["label"]],
    )
    texts = [
        f"{mb:.1f} MB" + (f"  ({p:.2f} M params)" if pd.notna(p) else "")
        for mb, p in zip(rows["size_mb"], numeric(rows, "params_m"), strict=True)
    ]
    ax.bar_label(bars, texts, padding=3, fontsize=8)
    ax.set_xlim(0, rows["size_mb"].max() * 1.45)
    ax.set_xlabel(TITLES["size_mb"])
    ax.set_title("Model size")
    ax.grid(axis="x", alpha=0.3)
    save(fig, path)
    return Drawn(list(rows["label"]))


def seed_spread(groups: pd.DataFrame, trials: pd.DataFrame, path: Path) -> Drawn:
    """Each configuration's seeds as dots, mean +- std as a bar: do differences hold?"""
    fig = Figure(figsize=(8, 1.0 + 0.42 * len(groups)), layout="constrained")
    ax = fig.add_subplot()
    ordered = groups.iloc[::-1].reset_index(drop=True)  # best on top
    for i, g in ordered.iterrows():
        values = trials.loc[trials["run_id"].isin(g["runs"]), OBJECTIVE].to_numpy(dtype=float)
        ax.scatter(values, np.full(len(values), i), s=18, color="0.35", zorder=3)
        if g["n"] > 1:
            ax.errorbar(g["mean"], i, xerr=g["std"], fmt="D", color="tab:blue", capsize=5, ms=6)
    ax.set_yticks(
        range(len(ordered)),
        [f"{lab}  (n={n})" for lab, n in zip(ordered["label"], ordered["n"], strict=True)],
    )
    ax.set_xlabel(TITLES[OBJECTIVE])
    _floor_line(ax, trials, axis="x")
    ax.set_title("Seed-to-seed spread: each seed (dots), mean ± std (blue)")
    ax.grid(axis="x", alpha=0.3)
    save(fig, path)
    runs = [run for group in groups["runs"] for run in group]
    return Drawn(list(trials.loc[trials["run_id"].isin(runs), "label"]))


def seed_bands(
    data: SweepData,
    groups: pd.DataFrame,
    colors: Mapping[str, tuple[float, ...]],
    trials: pd.DataFrame,
    path: Path,
    key: str = "val_miou",
) -> Drawn:
    """Mean +- std by epoch over the seeds of each repeated configuration."""
    repeated = groups[groups["n"] > 1].head(MAX_LINES)
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    drawn: list[str] = []
    for _, g in repeated.iterrows():
        runs = {r: data.history(r, key) for r in g["runs"]}
        runs = {r: s for r, s in runs.items() if len(s)}
        if not runs:
            continue
        frame = pd.concat(runs.values(), axis=1)
        mean, std = frame.mean(axis=1), frame.std(axis=1, ddof=1).fillna(0)
        first = trials.loc[trials["run_id"] == g["runs"][0], "label"].iloc[0]
        ax.plot(mean.index, mean, color=colors[first], lw=2, label=f"{g['label']} (n={g['n']})")
        ax.fill_between(mean.index, mean - std, mean + std, color=colors[first], alpha=0.2)
        drawn += list(trials.loc[trials["run_id"].isin(runs), "label"])
    if not drawn:
        return Drawn(note=f"no repeated configuration logged `{key}`: no seed bands")
    ax.set_title(f"{TITLES.get(key, key)} by epoch: mean ± std over seeds")
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    if key == "val_miou":
        _floor_line(ax, trials)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend(fig)
    save(fig, path)
    return Drawn(drawn)
