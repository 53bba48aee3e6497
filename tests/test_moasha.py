"""MO-ASHA (`tune.scheduler: moasha`): its decisions on recorded results, its place in the sweep
file, and a real sweep on Ray and MLflow that stops a dominated trial at a rung."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from segtune.config.sweep import load_sweep, validate_sweep
from segtune.errors import ConfigError
from segtune.sweep.feasible import INFEASIBLE_KEY
from segtune.sweep.moasha import Halving, crowding, fronts, rungs
from segtune.sweep.schedulers import SweepRun, logged_rungs
from segtune.sweep.search import trial_scheduler
from segtune.tracking.runs import TrialRun, start_sweep_run
from tests.servers import free_port
from tests.test_sweep import run, steps, trial_runs, write_sweep

# (trial, epoch, val_miou, size_mb, goes on?): arrivals in order, rungs at epochs 1, 2 and 4
RECORDED = [
    ("a", 1, 0.30, 10.0, True),  # first at the rung: nothing to lose to
    ("b", 1, 0.20, 20.0, False),  # a dominates it: worse and larger
    ("c", 1, 0.10, 5.0, True),  # worse than a but smaller: on the front with a
    ("d", 1, 0.25, 15.0, False),  # second-best mIoU, but a dominates it (ASHA would keep it)
    ("e", 1, 0.05, 2.0, True),  # the smallest: an end of the front
    ("a", 2, 0.40, 10.0, True),
    ("a", 3, 0.41, 10.0, True),  # between rungs: judged at epoch 2 already
    ("e", 2, 0.06, 2.0, True),  # a and e: one front, both ends
    ("c", 2, 0.20, 5.0, False),  # on the front, but inside it: the ends are kept (crowding)
    ("e", 3, 0.07, 2.0, True),
    ("e", 4, 0.08, 2.0, True),  # first at the last rung
    ("a", 4, 0.45, 10.0, True),  # a and e: neither dominates, a is an end of the front
    ("b", 5, 0.01, 99.0, True),  # past max_t: a trial's last result is never judged
]


@pytest.fixture
def sweep_run(tmp_path: Path) -> SweepRun:
    """(tracking URI, experiment, sweep run id) of sweep x without trials, in a sqlite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, "x", start_sweep_run(MlflowClient(uri), "x", "x", "name: x\n")


def test_rungs_promote_by_fronts_then_crowding() -> None:
    halving = Halving(["max", "min"], grace_period=1, reduction_factor=2, max_t=4)
    assert sorted(halving.recorded) == [1, 2, 4]
    decisions = [(t, e, halving.on_result(t, e, (m, c))) for t, e, m, c, _ in RECORDED]
    assert decisions == [(t, e, goes_on) for t, e, _, _, goes_on in RECORDED]
    assert set(halving.recorded[1]) == {"a", "b", "c", "d", "e"}
    assert set(halving.recorded[2]) == {"a", "c", "e"}


def test_one_objective_is_a_top_share() -> None:
    """With one metric the rule is ASHA's: the top 1/reduction_factor of the rung so far."""
    halving = Halving(["max"], grace_period=1, reduction_factor=3, max_t=8)
    assert rungs(1, 3, 8) == [1, 3]
    got = [halving.on_result(str(i), 1, (v,)) for i, v in enumerate([0.5, 0.4, 0.6, 0.1, 0.55])]
    assert got == [True, False, True, False, True]


def test_fronts_and_crowding() -> None:
    points = np.array([[1.0, 4.0], [2.0, 2.0], [4.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    assert fronts(points) == [[0, 1, 2], [3], [4]]
    distance = crowding(points[[0, 1, 2]])
    assert np.isinf(distance[0]) and np.isinf(distance[2])
    assert distance[1] == pytest.approx(3 / 3 + 3 / 3)  # its neighbours span each objective


def test_moasha_takes_several_metrics_and_asha_one(sweep_run: SweepRun) -> None:
    several = {"metric": ["val_miou", "size_mb"], "mode": ["max", "min"], "search": "optuna"}
    sweep = validate_sweep({"name": "x", "tune": {**several, "scheduler": "moasha"}})
    scheduler = trial_scheduler(sweep, sweep_run[0], sweep_run[2])
    assert scheduler.metrics == ["val_miou", "size_mb"]
    assert sorted(scheduler.halving.recorded) == [1, 2, 4, 8]  # train.epochs 10: judged by 9
    with pytest.raises(ConfigError, match="asha stops trials on one metric; use moasha"):
        validate_sweep({"name": "x", "tune": {**several, "scheduler": "asha"}})
    with pytest.raises(ConfigError, match="moasha ranks several metrics; use asha with one"):
        validate_sweep({"name": "x", "tune": {"scheduler": "moasha"}})
    with pytest.raises(ConfigError, match="moasha needs a per-epoch metric, not size_mb"):
        validate_sweep(
            {
                "name": "x",
                "tune": {**several, "scheduler": "moasha", "metric": ["size_mb", "val_miou"]},
            }
        )
    assert load_sweep("sweeps/pareto.yaml").tune.scheduler == "moasha"


@pytest.mark.parametrize("several", [False, True], ids=["asha", "moasha"])
def test_a_trial_never_trained_holds_no_place_in_a_rung(several: bool, sweep_run: SweepRun) -> None:
    """Two trials broke the constraints (their one result: -inf mIoU, at epoch 1) before a
    trained one; a weaker trained one must still be stopped at the rung. Ray's ASHA ranked the
    -inf: the rung's cutoff was NaN and it stopped nothing."""
    scheduler = _scheduler(sweep_run, several, reduction_factor=3)
    trials = [Trial("__fake", stub=True) for _ in range(4)]
    results = [
        {"val_miou": -np.inf, "size_mb": 1.0, INFEASIBLE_KEY: True},
        {"val_miou": -np.inf, "size_mb": 1.0, INFEASIBLE_KEY: True},
        {"val_miou": 0.5, "size_mb": 2.0},
        {"val_miou": 0.3, "size_mb": 2.0},
    ]
    actions = []
    for trial, result in zip(trials, results, strict=True):
        scheduler.on_trial_add(None, trial)
        actions.append(scheduler.on_trial_result(None, trial, {**result, "training_iteration": 1}))
        if result.get(INFEASIBLE_KEY):
            scheduler.on_trial_complete(None, trial, {**result, "training_iteration": 1})
    assert actions == [TrialScheduler.CONTINUE] * 3 + [TrialScheduler.STOP]
    if several:  # where the two would rank first on size_mb
        assert sorted(scheduler.halving.recorded[1]) == sorted(t.trial_id for t in trials[2:])


def _scheduler(sweep_run: SweepRun, several: bool, reduction_factor: int) -> Any:
    """Sweep x's scheduler: MO-ASHA on mIoU and size, or ASHA on mIoU, rungs at 1, rf, rf²..."""
    metric = ["val_miou", "size_mb"] if several else "val_miou"
    mode = ["max", "min"] if several else "max"
    tune = {
        "metric": metric,
        "mode": mode,
        "search": "optuna",
        "reduction_factor": reduction_factor,
    }
    sweep = validate_sweep(
        {"name": "x", "tune": {**tune, "scheduler": "moasha" if several else "asha"}}
    )
    uri, _, parent = sweep_run
    scheduler = trial_scheduler(sweep, uri, parent)
    if not several:  # Tune gives ASHA its metric from the TuneConfig
        scheduler.set_search_properties("val_miou", "max")
    return scheduler


@pytest.mark.parametrize("several", [False, True], ids=["asha", "moasha"])
def test_a_resumed_sweeps_rungs_hold_the_epochs_logged_before(
    several: bool, sweep_run: SweepRun
) -> None:
    """Ray saves no scheduler: the scheduler of a resumed sweep (built anew by Tuner.restore's
    pickle) reads its trials' epochs from MLflow at its first trial, so a weak trial after the
    resume is stopped at the first rung, as it would have been without the resume."""
    uri, _, parent = sweep_run
    client = MlflowClient(uri)
    for i, (miou, size) in enumerate([(0.6, 2.0), (0.5, 1.0), (0.4, 1.5)]):
        run = TrialRun.open(client, experiment="x", parent_run_id=parent, label=f"t{i}",
                            config_label=f"t{i}", trial_id=f"before{i}", params={})  # fmt: skip
        for epoch in range(3):
            run.log_epoch(epoch, {"val_miou": miou + 0.01 * epoch, "train_loss": 1.0})
        run.log_final({"size_mb": size})
    scheduler = _scheduler(sweep_run, several, reduction_factor=2)
    weak, restored = Trial("__fake", stub=True), Trial("__fake", stub=True, trial_id="before0")
    for trial in (weak, restored):
        scheduler.on_trial_add(None, trial)
    result = {"val_miou": 0.1, "size_mb": 3.0, "training_iteration": 1}
    assert scheduler.on_trial_result(None, weak, result) == TrialScheduler.STOP
    # a restored trial is not judged again at a rung it passed before the resume
    result = {"val_miou": 0.0, "size_mb": 3.0, "training_iteration": 3}
    assert scheduler.on_trial_result(None, restored, result) == TrialScheduler.CONTINUE


def test_a_lost_tracking_server_leaves_the_rungs_empty_at_once() -> None:
    """Read from Tune's loop: MLflow's retries on a server that is gone would hold every trial
    for minutes, so the server is asked first, with a short timeout."""
    started = time.monotonic()
    gone = (f"http://127.0.0.1:{free_port()}", "x", "0" * 32)
    assert logged_rungs(gone, ["val_miou"], [1, 2]) == {}
    assert time.monotonic() - started < 30


def test_moasha_stops_a_dominated_trial(synthetic_root: Path, tmp_path: Path) -> None:
    """Two objectives that every epoch reports (val_miou up, val_loss down): a trial that cannot
    learn (lr 1e-7) is dominated at a rung by one that learns, and stops there. (After one
    epoch the learner's mIoU may still trail while its loss leads: no domination yet.)"""
    sweep = write_sweep(
        tmp_path / "moasha.yaml",
        synthetic_root,
        train={"epochs": 3, "seed": 0},
        search_space={"lr": {"choice": [0.01, 1.0e-7]}},
        tune={
            "metric": ["val_miou", "val_loss"],
            "mode": ["max", "min"],
            "search": "optuna",
            "sampler": "nsga2",
            "num_samples": 4,
            "scheduler": "moasha",
            "grace_period": 1,
            "reduction_factor": 2,
            "max_concurrent_trials": 1,
        },
    )
    proc = run(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(trial_runs(tmp_path, "moasha"), key=lambda r: r.info.start_time)
    epochs = [(r.data.params["lr"], len(steps(tmp_path, r.info.run_id))) for r in runs]
    assert len(runs) == 4
    learns = [i for i, (lr, _) in enumerate(epochs) if lr == "0.01"]
    assert learns and all(epochs[i][1] == 3 for i in learns), epochs
    stopped = [i for i, (_, n) in enumerate(epochs) if n < 3]
    assert stopped, f"MO-ASHA stopped nothing: {epochs}"
    # only trials that cannot learn stop, and only once a learner was recorded before them
    assert all(epochs[i][0] == "1e-07" and i > learns[0] for i in stopped), epochs
    for i in stopped:
        tag = runs[i].data.tags["segtune.early_stopped"]
        assert tag == f"after {epochs[i][1]} epochs" and runs[i].info.status == "FINISHED"
