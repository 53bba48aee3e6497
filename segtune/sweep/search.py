"""The searcher and the trial scheduler a sweep file names, built for Ray Tune."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from segtune.config.sweep import SweepConfig

if TYPE_CHECKING:  # Optuna is imported by sweeps that use it only
    from segtune.sweep.warm import Told


def searcher(sweep: SweepConfig, offset: int = 0, told: Sequence[Told] = ()) -> Any:
    """Optuna's searcher (None for grid and random: Ray's variant generator); `offset` moves its
    seed, for trials added to a sweep (`segtune.sweep.edits.Addition`); `told`: earlier trials
    it knows before its first suggestion (`segtune.sweep.warm`). Under tune.constraints its
    sampler learns them from each trial's constraint values (segtune.sweep.optuna_search)."""
    if sweep.tune.search != "optuna":
        return None
    import optuna

    from segtune.sweep.optuna_search import ConstraintValues, SweepOptunaSearch

    objectives = sweep.objectives()
    seed = int(sweep.train_value("seed")) + offset
    constraints = sweep.tune.constraint_list()
    limits = {"constraints_func": ConstraintValues(len(constraints))} if constraints else {}
    sampler = (
        optuna.samplers.NSGAIISampler(seed=seed, **limits)
        if sweep.tune.sampler == "nsga2"
        else optuna.samplers.TPESampler(seed=seed, multivariate=True, **limits)
    )
    metrics = [m for m, _ in objectives]
    modes = [m for _, m in objectives]
    return SweepOptunaSearch(
        constraints,
        told,
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=sampler,
    )


def trial_scheduler(sweep: SweepConfig, tracking_uri: str, parent: str) -> Any:
    """ASHA on the sweep's one objective, MO-ASHA on its several, or None (FIFO); neither
    ranks the one result of a trial that breaks tune.constraints, and both start from the
    epochs the trials of sweep run `parent` logged before (a resumed sweep)."""
    if sweep.tune.scheduler == "fifo":
        return None
    epochs = int(sweep.train_value("epochs"))
    # Rungs lie at grace * rf^k <= max_t: below the last epoch, so that a trial is judged while
    # it still has epochs to save, and never stopped between its last epoch and its final
    # evaluation and benchmark (which come as one more report).
    if sweep.tune.scheduler == "moasha":
        from segtune.sweep.schedulers import MOASHA

        return MOASHA(sweep.objectives(), sweep.tune.grace_period, sweep.tune.reduction_factor,
                      max_t=max(1, epochs - 1),
                      sweep_run=(tracking_uri, sweep.experiment, parent))  # fmt: skip
    from segtune.sweep.schedulers import FeasibleASHA

    return FeasibleASHA(
        (tracking_uri, sweep.experiment, parent),
        time_attr="training_iteration",
        max_t=max(1, epochs - 1),
        grace_period=sweep.tune.grace_period,
        reduction_factor=sweep.tune.reduction_factor,
        stop_last_trials=False,
    )
