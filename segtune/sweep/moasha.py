"""MO-ASHA: asynchronous successive halving whose rungs promote by Pareto rank, not one metric.

`tune.scheduler: moasha` (several `tune.metric`s). The decision rule is `Halving`, a pure class
(no Ray) that the replay bench (`segtune.sweep.replay`) runs on recorded curves;
`segtune.sweep.schedulers.MOASHA` is the thin Ray Tune `TrialScheduler` around it.

The rule is Schmucker et al., "Multi-objective Asynchronous Successive Halving" (2021, arXiv
2106.12639; Syne Tune's `MOASHA`): rungs at grace_period * reduction_factor^k epochs, as in ASHA
(Li et al. 2020; Ray's `AsyncHyperBandScheduler`); a trial reaching a rung is ranked with the
trials recorded there so far by non-dominated sorting (fronts, NSGA-II's), ties within a front
broken by crowding distance (the paper's NSGA-II variant: spread along the front is kept), and
it goes on iff fewer than 1/reduction_factor of those recorded trials rank ahead of it (it is in
their top 1/reduction_factor; ties go its way, as ASHA keeps a trial equal to its cutoff);
otherwise it stops there. Asynchronous: no trial waits for a rung to fill, so the first trial at
a rung goes on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs at which trials are judged, ascending: grace * rf^k <= max_t (ASHA's)."""
    out: list[int] = []
    k = 0
    while (milestone := grace_period * reduction_factor**k) <= max_t:
        if not out or int(milestone) != out[-1]:
            out.append(int(milestone))
        k += 1
    return out


def fronts(points: np.ndarray) -> list[list[int]]:
    """Non-dominated sorting of `points` (rows, every column minimised): the indices of the first
    front, then of the front once it is removed, and so on (Deb et al. 2002)."""
    n = len(points)
    no_worse = (points[:, None, :] <= points[None, :, :]).all(axis=2)
    better = (points[:, None, :] < points[None, :, :]).any(axis=2)
    dominates = no_worse & better  # [i, j]: i dominates j
    left = set(range(n))
    out: list[list[int]] = []
    while left:
        front = [j for j in sorted(left) if not any(dominates[i, j] for i in left)]
        out.append(front)
        left -= set(front)
    return out


def crowding(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each row within one front: the ends of each objective are
    infinitely far, the others by the normalised gap between their neighbours."""
    n, m = points.shape
    distance = np.zeros(n)
    for k in range(m):
        order = np.argsort(points[:, k], kind="stable")
        span = points[order[-1], k] - points[order[0], k]
        distance[order[0]] = distance[order[-1]] = math.inf
        if span > 0:
            for a, b, c in zip(order, order[1:], order[2:], strict=False):
                distance[b] += (points[c, k] - points[a, k]) / span
    return distance


def priority(points: np.ndarray) -> list[int]:
    """The row indices from best to worst: by front, then by crowding distance, descending;
    equal rows keep their order (put the trial being judged first to let ties go on)."""
    order: list[int] = []
    for front in fronts(points):
        distance = crowding(points[front])
        order.extend(front[i] for i in sorted(range(len(front)), key=lambda i: -distance[i]))
    return order


class Halving:
    """MO-ASHA's decisions for one sweep, trial by trial as their results come.

    `modes` ("max"/"min") are the objectives' directions; `max_t` the last epoch a trial may be
    judged at (the driver keeps the last epoch free, as for ASHA).
    """

    def __init__(
        self, modes: Sequence[str], grace_period: int, reduction_factor: float, max_t: int
    ) -> None:
        if reduction_factor <= 1 or grace_period < 1:
            raise ValueError("moasha: grace_period >= 1 and reduction_factor > 1")
        self.signs = np.array([-1.0 if mode == "max" else 1.0 for mode in modes])
        self.reduction_factor = reduction_factor
        self.max_t = max_t
        self.recorded: dict[int, dict[str, np.ndarray]] = {
            r: {} for r in rungs(grace_period, reduction_factor, max_t)
        }

    def on_result(self, trial: str, epoch: int, objectives: Sequence[float]) -> bool:
        """True: the trial goes on; False: it stops here. `epoch` counts from 1. A trial is
        judged once per rung, at its first result at or past it and not past `max_t` (the
        trainable's last result, its evaluation, is never judged)."""
        if epoch > self.max_t:
            return True
        for milestone in sorted(self.recorded, reverse=True):
            if epoch < milestone:
                continue
            recorded = self.recorded[milestone]
            if trial in recorded:
                return True
            point = np.asarray(objectives, dtype=float) * self.signs
            ahead = priority(np.array([point, *recorded.values()])).index(0)
            before = len(recorded)
            recorded[trial] = point
            return before == 0 or ahead < before / self.reduction_factor
        return True
