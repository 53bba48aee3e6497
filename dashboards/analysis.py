"""The numbers behind the pictures: curve smoothing and seed-to-seed spread.

Pareto fronts and constraints, which export uses too, live in `segtune.tracking.select`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from segtune.config.names import OBJECTIVE
from segtune.errors import ConfigError


def ema(values: Sequence[float] | np.ndarray, weight: float, log: bool = False) -> np.ndarray:
    """TensorBoard's smoothing (debiased EMA), as the study drew its loss curves.

    s_t = sum_k w^(t-k) (1-w) x_k / sum_k w^(t-k) (1-w): the first point is not dragged
    towards zero; a missing value keeps the previous smoothed value. With `log`, the average
    is taken of the logarithms (for a log axis): a first loss of 10^4 then no longer holds the
    line hundreds of times above the values that follow.
    """
    x = np.asarray(values, dtype=float)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(x > 0, np.log(x), np.nan)
    out = np.empty(len(x))
    num = den = 0.0
    for i, value in enumerate(x):
        if np.isfinite(value):
            num = weight * num + (1 - weight) * value
            den = weight * den + (1 - weight)
        out[i] = num / den if den > 0 else np.nan
    return np.exp(out) if log else out


def smoothing_points(weight: float) -> int:
    """The fewest points for which an EMA of `weight` means anything: three of its time
    constants (1 / (1 - weight) points each), and never fewer than 5. Shorter series are drawn
    raw."""
    return max(5, math.ceil(round(3 / (1 - weight), 6))) if weight > 0 else 0


def check_ema(weight: float) -> float:
    if not 0.0 <= weight < 1.0:
        raise ConfigError(f"--ema {weight}: the smoothing weight must be in [0, 1) (0: raw values)")
    return weight


# --- seeds -----------------------------------------------------------------------------------


def seed_groups(table: pd.DataFrame, metric: str = OBJECTIVE) -> pd.DataFrame:
    """Per configuration (all params but the seed): n seeds, mean, std, min, max of `metric`,
    over the trials trained to their end (FINISHED, not stopped early by a scheduler): a
    failed or early-stopped seed would pull a configuration's mean down."""
    rows = []
    columns = ["config", "label", "n", "mean", "std", "min", "max", "runs"]
    if metric not in table.columns:
        return pd.DataFrame(columns=columns)
    table = table[(table["status"] == "FINISHED") & (table["early_stopped"].fillna("") == "")]
    for config, group in table.groupby("config", sort=False):
        values = pd.to_numeric(group[metric], errors="coerce").dropna()
        if values.empty:
            continue
        rows.append(
            {
                "config": config,
                "label": group["config_label"].iloc[0],
                "n": len(values),
                "mean": values.mean(),
                "std": values.std(ddof=1) if len(values) > 1 else np.nan,
                "min": values.min(),
                "max": values.max(),
                "runs": list(group.loc[values.index, "run_id"]),
            }
        )
    frame = pd.DataFrame(rows, columns=columns)  # no rows where no trial has the metric
    return frame.sort_values("mean", ascending=False).reset_index(drop=True)


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    diff: float  # mean(a) - mean(b)
    std_a: float
    std_b: float
    differs_in: str  # the params that tell the configurations apart

    @property
    def beyond_spread(self) -> bool:
        """The mean +- std bars of the two configurations do not overlap."""
        return abs(self.diff) > self.std_a + self.std_b


def _param_diff(a: str, b: str) -> list[str]:
    da = dict(p.split("=", 1) for p in a.split(";") if p)
    db = dict(p.split("=", 1) for p in b.split(";") if p)
    return sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))


def compare_configs(groups: pd.DataFrame, limit: int = 30) -> list[Comparison]:
    """Pairs of configurations that both ran several seeds: is their difference beyond the spread?

    Pairs that differ in one param (the study's questions: augmentation or not, ASPP or not)
    come first, then every other configuration against the best; at most `limit`.
    """
    repeated = groups[groups["n"] > 1].reset_index(drop=True)
    pairs = []
    for (_, x), (_, y) in itertools.combinations(repeated.iterrows(), 2):
        diff = _param_diff(x["config"], y["config"])
        if len(diff) != 1 and x.name != 0:  # x.name 0: the best configuration
            continue
        hi, lo = (x, y) if x["mean"] >= y["mean"] else (y, x)
        comparison = Comparison(
            a=hi["label"],
            b=lo["label"],
            diff=hi["mean"] - lo["mean"],
            std_a=hi["std"],
            std_b=lo["std"],
            differs_in=", ".join(diff),
        )
        pairs.append((len(diff) != 1, comparison))
    pairs.sort(key=lambda p: (p[0], -abs(p[1].diff)))
    return [c for _, c in pairs[:limit]]
