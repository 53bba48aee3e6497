"""The replay bench (`python -m segtune.bench replay`): search strategies replayed on a finished
sweep's recorded curves, without training, to choose a strategy for the next sweep.

Every strategy runs over the recorded configurations in an order a seed draws, a trial-epoch at
a time, until its budget of trial-epochs is spent: grid (each configuration once, trained to the
end), random (configurations drawn with replacement, trained to the end), ASHA on mIoU (Ray's own
`ASHAScheduler`; `tune.scheduler: asha` runs it as `FeasibleASHA`, the same on trained trials)
and MO-ASHA on mIoU and the sweep's cost (`segtune.sweep.moasha.Halving`, as `tune.scheduler:
moasha` runs it). With constraints, the
configurations whose costs break one are removed first, as `tune.constraints` does. A trial's
found point is its best mIoU over the epochs it ran and its model's cost; a strategy's result is
the hypervolume of its points' Pareto front (`hypervolume`) as a share of the whole grid's
(of its feasible trials' with constraints).
Trial-epochs are the budget's unit: the recording holds epochs, not their seconds.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from segtune.config.constraints import Constraint, broken, parse_constraints
from segtune.config.names import MODEL_COSTS
from segtune.errors import ConfigError
from segtune.sweep.moasha import Halving
from segtune.sweep.recording import (
    Recording,
    Trial,
    load_json,
    read_recording,
    write_json,
    write_to_mlflow,
)

STRATEGIES = ("grid", "random", "asha", "moasha")
BUDGETS = (0.25, 0.5, 1.0)  # shares of the grid's trial-epochs
REFERENCE_MARGIN = 0.1  # the reference point: the grid's worst of each objective, plus this share

Box = tuple[float, float, float, float]  # the grid's mIoU low and high, cost low and high
Decide = Callable[[int, int], bool]  # (trial, epochs run) -> goes on


def hypervolume(points: Sequence[tuple[float, float]], box: Box) -> float:
    """The area that (mIoU, cost) points dominate, each objective normalised by the grid's range
    (`box`) and the reference point beyond its worst by REFERENCE_MARGIN (2-D: one sweep over
    the front by cost). Normalised so that neither objective's units weigh, and the reference
    near the grid's worst so that the area tells fronts apart (from mIoU 0 every front of
    trained models covers nearly the same area)."""
    m_low, m_high, c_low, c_high = box
    m_span, c_span = (m_high - m_low) or 1.0, (c_high - c_low) or 1.0
    area, best = 0.0, -REFERENCE_MARGIN
    for miou, cost in sorted(points, key=lambda p: (p[1], -p[0])):
        m, c = (miou - m_low) / m_span, (cost - c_low) / c_span
        if m > best and c < 1.0 + REFERENCE_MARGIN:
            area += (m - best) * (1.0 + REFERENCE_MARGIN - c)
            best = m
    return area


@dataclass(frozen=True)
class Outcome:
    """One run of a strategy: trial-epochs spent, best mIoU, share of the grid's hypervolume."""

    epochs: int
    best_miou: float
    hv_share: float


@dataclass(frozen=True)
class Replay:
    """The recorded trials, the cost the fronts use, and the halving settings."""

    trials: Sequence[Trial]
    cost: str
    grace_period: int = 1
    reduction_factor: float = 2.0
    workers: int = 1

    @property
    def epochs(self) -> int:
        return max(len(t.curve) for t in self.trials)

    @property
    def grid_epochs(self) -> int:
        return sum(len(t.curve) for t in self.trials)

    def box(self) -> Box:
        """The whole grid's range of best mIoU and of cost: the hypervolume's normalisation."""
        best = [max(t.curve) for t in self.trials]
        costs = [t.costs[self.cost] for t in self.trials]
        return min(best), max(best), min(costs), max(costs)

    def grid_volume(self, feasible: Sequence[int]) -> float:
        points = [(max(self.trials[i].curve), self.trials[i].costs[self.cost]) for i in feasible]
        return hypervolume(points, self.box())

    def run(
        self, strategy: str, budget: int, seed: int, constraints: Sequence[Constraint] = ()
    ) -> Outcome:
        rng = random.Random(seed)
        feasible = [i for i, t in enumerate(self.trials) if _meets(t, constraints)]
        if strategy == "random":
            order = [rng.choice(feasible) for _ in range(budget)]  # more than it can train
        else:
            order = rng.sample(feasible, len(feasible))
        decide = self._decider(strategy, order)
        ran = _schedule(order, [len(self.trials[i].curve) for i in order], decide, budget,
                        self.workers)  # fmt: skip
        points = [
            (max(self.trials[order[k]].curve[:n]), self.trials[order[k]].costs[self.cost])
            for k, n in ran.items()
            if n
        ]
        whole = self.grid_volume(feasible)
        return Outcome(
            epochs=sum(ran.values()),
            best_miou=max((m for m, _ in points), default=math.nan),
            hv_share=hypervolume(points, self.box()) / whole if whole else math.nan,
        )

    def _decider(self, strategy: str, order: Sequence[int]) -> Decide | None:
        """The stop rule of a halving strategy, None for grid and random; the last epoch is
        never judged (as the driver sets max_t)."""
        max_t = max(1, self.epochs - 1)
        if strategy == "moasha":
            halving = Halving(["max", "min"], self.grace_period, self.reduction_factor, max_t)

            def moasha(k: int, n: int) -> bool:
                t = self.trials[order[k]]
                return halving.on_result(str(k), n, (t.curve[n - 1], t.costs[self.cost]))

            return moasha
        if strategy == "asha":
            from ray.tune.schedulers import ASHAScheduler, TrialScheduler

            asha = ASHAScheduler(
                time_attr="training_iteration", metric="val_miou", mode="max", max_t=max_t,
                grace_period=self.grace_period, reduction_factor=self.reduction_factor,
                stop_last_trials=False,
            )  # fmt: skip
            added: set[int] = set()

            def ray_asha(k: int, n: int) -> bool:
                trial = SimpleNamespace(trial_id=str(k))  # all its scheduler reads of a trial
                if k not in added:
                    asha.on_trial_add(None, trial)
                    added.add(k)
                result = {"training_iteration": n, "val_miou": self.trials[order[k]].curve[n - 1]}
                return asha.on_trial_result(None, trial, result) != TrialScheduler.STOP

            return ray_asha
        return None


def _meets(trial: Trial, constraints: Sequence[Constraint]) -> bool:
    return not broken(list(constraints), trial.costs)


def _schedule(
    order: Sequence[int], lengths: Sequence[int], decide: Decide | None, budget: int, workers: int
) -> dict[int, int]:
    """Epochs each trial ran: `workers` slots take trials in `order`; each round, every running
    trial trains one epoch (slot by slot) and is judged, until the budget is spent."""
    ran: dict[int, int] = {}
    queue = iter(range(len(order)))
    running: list[int] = []
    spent = 0
    while spent < budget:
        running += itertools.islice(queue, workers - len(running))
        if not running:
            break
        for k in list(running):
            if spent >= budget:
                break
            ran[k] = ran.get(k, 0) + 1
            spent += 1
            if ran[k] >= lengths[k] or (decide is not None and not decide(k, ran[k])):
                running.remove(k)
    return ran


@dataclass(frozen=True)
class Row:
    strategy: str
    constraints: str
    budget: float
    epochs: float
    best_miou: float
    hv_share: float


def replay_table(
    replay: Replay,
    constraints: Sequence[Constraint] = (),
    seeds: int = 10,
    strategies: Sequence[str] = STRATEGIES,
    budgets: Sequence[float] = BUDGETS,
) -> list[Row]:
    """Median over `seeds` of each strategy at each budget, without and with `constraints`."""
    rows = []
    settings = [()] + ([list(constraints)] if constraints else [])
    for kept in settings:
        label = ",".join(map(str, kept)) or "none"
        for strategy in strategies:
            for share in budgets:
                budget = round(share * replay.grid_epochs)
                runs = [replay.run(strategy, budget, seed, kept) for seed in range(seeds)]
                rows.append(Row(
                    strategy, label, share,
                    statistics.median(r.epochs for r in runs),
                    float(np.nanmedian([r.best_miou for r in runs])),
                    float(np.nanmedian([r.hv_share for r in runs])),
                ))  # fmt: skip
    return rows


def format_table(rows: Sequence[Row], grid_epochs: int) -> str:
    """Plain text, one line per strategy x constraints x budget."""
    width = max(len("constraints"), *(len(r.constraints) for r in rows))
    lines = [
        f"{'strategy':<8} {'constraints':<{width}} {'budget':>6} {'trial-epochs':>12} "
        f"{'of grid':>7} {'best mIoU':>9} {'hypervolume':>11}"
    ]
    for r in rows:
        lines.append(
            f"{r.strategy:<8} {r.constraints:<{width}} {r.budget:>6.0%} {r.epochs:>12.0f} "
            f"{r.epochs / grid_epochs:>7.0%} {r.best_miou:>9.3f} {r.hv_share:>11.0%}"
        )
    return "\n".join(lines)


def replay_settings(
    recording: Recording, cost: str | None, grace: int | None, factor: float | None
) -> tuple[str, int, float]:
    """The cost the fronts use (`cost`, else the sweep's second objective, else infer_ms_cpu),
    the grace period and reduction factor (given, else the sweep file's, else ASHA's defaults)."""
    tune = recording.tune
    metrics = tune.get("metric")
    if cost is None:
        cost = metrics[1] if isinstance(metrics, list) and len(metrics) > 1 else "infer_ms_cpu"
    grace = grace if grace is not None else int(tune.get("grace_period", 1))
    factor = factor if factor is not None else float(tune.get("reduction_factor", 2.0))
    if grace < 1 or factor <= 1:
        raise ConfigError("--grace-period must be >= 1 and --reduction-factor > 1")
    return cost, grace, factor


def replay_command(
    experiment: str | None,
    tracking_uri: str | None,
    constraints: str | None,
    cost: str | None,
    seeds: int,
    halving: tuple[int | None, float | None] = (None, None),
    load: Path | None = None,
    export: Path | None = None,
) -> str:
    """What `python -m segtune.bench replay` prints: read the sweep (after writing `load`, a
    recording's JSON, into the store), keep it as JSON at `export`, replay every strategy;
    `halving`: grace period and reduction factor other than the sweep file's."""
    if load is not None:
        if tracking_uri is None:
            raise ConfigError("--load writes a recording into a store: give --tracking-uri")
        recording = load_json(load)
        write_to_mlflow(recording, tracking_uri)
        experiment = recording.experiment
    if experiment is None:
        raise ConfigError("name the finished sweep: --experiment NAME (or --load FILE)")
    recording = read_recording(experiment, tracking_uri)
    if export is not None:
        write_json(recording, export)
    cost, grace, factor = replay_settings(recording, cost, *halving)
    missing = [t.label for t in recording.trials if cost not in t.costs]
    if missing:
        raise ConfigError(f"--cost {cost}: not recorded for {', '.join(missing[:5])}; "
                          f"one of {', '.join(MODEL_COSTS)}")  # fmt: skip
    wanted = constraints if constraints is not None else sweep_constraints(recording)
    kept = parse_constraints(wanted) if wanted else []
    if kept and not any(_meets(t, kept) for t in recording.trials):
        raise ConfigError(f"--constraints {wanted}: no recorded trial meets them")
    replay = Replay(recording.trials, cost, grace, factor)
    rows = replay_table(replay, kept, seeds)
    header = (
        f"# {experiment}: {len(recording.trials)} trials x {replay.epochs} epochs = "
        f"{replay.grid_epochs} trial-epochs; fronts on val_miou (max) and {cost} (min); "
        f"halving: grace_period {grace}, reduction_factor {factor:g}; median of {seeds} seeds; "
        "hypervolume as a share of the grid's (of its feasible trials with constraints)"
    )
    return header + "\n" + format_table(rows, replay.grid_epochs)


def sweep_constraints(recording: Recording) -> str:
    """The sweep's own `tune.constraints` (`{size_mb: "<=30"}`) as `--constraints` text."""
    found = recording.tune.get("constraints") or {}
    return ",".join(f"{key}{value}".replace(" ", "") for key, value in found.items())
