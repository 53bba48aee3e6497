"""The numbers behind the pictures: smoothing, Pareto fronts, budgets and seed-to-seed spread."""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from segtune.errors import ConfigError

OBJECTIVE = "best_val_miou"
COSTS = ("train_time_min", "infer_ms_gpu", "infer_ms_cpu")


def ema(values: Sequence[float] | np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing (debiased EMA), as the seed drew its loss curves.

    s_t = sum_k w^(t-k) (1-w) x_k / sum_k w^(t-k) (1-w): the first point is not dragged
    towards zero; a missing value keeps the previous smoothed value.
    """
    out = np.empty(len(values))
    num = den = 0.0
    for i, value in enumerate(np.asarray(values, dtype=float)):
        if np.isfinite(value):
            num = weight * num + (1 - weight) * value
            den = weight * den + (1 - weight)
        out[i] = num / den if den > 0 else np.nan
    return out


def check_ema(weight: float) -> float:
    if not 0.0 <= weight < 1.0:
        raise ConfigError(f"--ema {weight}: the smoothing weight must be in [0, 1) (0: raw values)")
    return weight


def pareto_front(
    df: pd.DataFrame,
    objective: str = OBJECTIVE,
    costs: Sequence[str] | str = ("train_time_min",),
    modes: Mapping[str, str] | None = None,
) -> pd.Series:
    """True for the trials that no other trial dominates on `objective` and `costs`.

    `modes` maps a column to "max" or "min" (defaults: objective max, costs min). A trial
    dominates another when it is at least as good on every column and better on one; trials
    missing any of the columns are never on the front and never dominate.
    """
    costs = [costs] if isinstance(costs, str) else list(costs)
    columns = [objective, *costs]
    modes = {objective: "max", **{c: "min" for c in costs}, **(modes or {})}
    for column in columns:
        if modes[column] not in ("max", "min"):
            raise ConfigError(f"pareto_front: mode {modes[column]!r} of {column}: use max or min")
    mask = pd.Series(False, index=df.index)
    if any(c not in df.columns for c in columns):
        return mask
    values = df[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    complete = np.isfinite(values).all(axis=1)
    # as "higher is better" everywhere
    signs = np.array([1.0 if modes[c] == "max" else -1.0 for c in columns])
    v = values[complete] * signs
    at_least = (v[:, None, :] >= v[None, :, :]).all(axis=2)  # [i, j]: i at least as good as j
    better = (v[:, None, :] > v[None, :, :]).any(axis=2)
    dominated = (at_least & better).any(axis=0)
    mask[complete] = ~dominated
    return mask


# --- budgets ---------------------------------------------------------------------------------

_OPS: dict[str, Callable[[object, object], object]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_CONSTRAINT = re.compile(
    r"^\s*([A-Za-z_][\w.\-]*)\s*(<=|>=|<|>)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True)
class Constraint:
    column: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value:g}"

    def holds(self, df: pd.DataFrame) -> pd.Series:
        """Where the column is missing the constraint does not hold: unknown is not within budget."""
        values = pd.to_numeric(df[self.column], errors="coerce")
        return values.notna() & _OPS[self.op](values, self.value)


def parse_budget(text: str) -> list[Constraint]:
    """`"infer_ms_cpu<=50,size_mb<20"` to constraints; anything else is a ConfigError."""
    constraints = []
    for part in text.split(","):
        match = _CONSTRAINT.match(part)
        if not part.strip() or match is None:
            raise ConfigError(
                f"--budget {text!r}: cannot read {part.strip()!r}; expected comma-separated "
                "METRIC<=VALUE constraints (operators <=, <, >=, >), e.g. "
                "'infer_ms_cpu<=50,size_mb<20'"
            )
        try:
            value = float(match.group(3))
        except ValueError:
            raise ConfigError(f"--budget {text!r}: {match.group(3)!r} is not a number") from None
        constraints.append(Constraint(match.group(1), match.group(2), value))
    return constraints


def within_budget(
    df: pd.DataFrame, constraints: Sequence[Constraint], metric_columns: Sequence[str]
) -> pd.Series:
    """Trials meeting every constraint; a constraint on a metric no trial has is a ConfigError."""
    mask = pd.Series(True, index=df.index)
    for c in constraints:
        if c.column not in metric_columns:
            raise ConfigError(
                f"--budget: no metric {c.column!r} in this sweep; metrics: "
                f"{', '.join(metric_columns)}"
            )
        mask &= c.holds(df)
    return mask


# --- seeds -----------------------------------------------------------------------------------


def seed_groups(table: pd.DataFrame, metric: str = OBJECTIVE) -> pd.DataFrame:
    """Per configuration (all params but the seed): n seeds, mean, std, min, max of `metric`."""
    rows = []
    if metric not in table.columns:
        return pd.DataFrame(columns=["config", "label", "n", "mean", "std", "min", "max", "runs"])
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
    frame = pd.DataFrame(rows)
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

    Pairs that differ in one param (the seed's questions: augmentation or not, ASPP or not)
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
