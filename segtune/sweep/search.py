"""The searcher and the trial scheduler a sweep file names, built for Ray Tune."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from segtune.config.sweep import SweepConfig


def searcher(sweep: SweepConfig, offset: int = 0, told: Sequence[Any] = ()) -> Any:
    """Optuna's searcher (None for grid and random: Ray's variant generator); `offset` moves its
    seed, for trials added to a sweep (`segtune.sweep.edits.Addition`); `told`: earlier trials
    it knows before its first suggestion (`segtune.sweep.warm`)."""
    if sweep.tune.search != "optuna":
        return None
    import optuna

    from segtune.sweep.warm import WarmOptunaSearch

    objectives = sweep.objectives()
    seed = int(sweep.train_value("seed")) + offset
    sampler = (
        optuna.samplers.NSGAIISampler(seed=seed)
        if sweep.tune.sampler == "nsga2"
        else optuna.samplers.TPESampler(seed=seed, multivariate=True)
    )
    metrics = [m for m, _ in objectives]
    modes = [m for _, m in objectives]
    return WarmOptunaSearch(
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=sampler,
        told=told,
    )


def trial_scheduler(sweep: SweepConfig) -> Any:
    """ASHA on the sweep's one objective, or None (FIFO)."""
    if sweep.tune.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = int(sweep.train_value("epochs"))
    # Rungs lie at grace * rf^k <= max_t: below the last epoch, so that a trial is judged while
    # it still has epochs to save, and never stopped between its last epoch and its final
    # evaluation and benchmark (which come as one more report).
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(1, epochs - 1),
        grace_period=sweep.tune.grace_period,
        reduction_factor=sweep.tune.reduction_factor,
        stop_last_trials=False,
    )
