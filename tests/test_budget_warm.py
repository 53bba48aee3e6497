"""A sweep's compute budget and warm start (issue 27, items 4 and 5), on a real local Ray and a
real MLflow store: each test runs `python -m segtune.run` as a user would, then reads MLflow."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from segtune.config.names import (
    BUDGET_SPENT_METRIC,
    BUDGET_TAG,
    DATASET_TAG,
    REUSED_TAG,
    ROLE_TAG,
    TRIAL_ID_TAG,
)
from segtune.config.sweep import load_sweep, validate_sweep
from segtune.data.dataset import fingerprint
from segtune.errors import ConfigError
from segtune.sweep.budget import STATE_FILE, Before, Budget, spent_before
from segtune.sweep.space import resolve_trial
from segtune.tracking.runs import TrialRun, start_sweep_run
from tests.helpers import wait_for
from tests.test_restore import EPOCHS, Killed, _group_gone
from tests.test_sweep import run, steps, trial_runs, write_sweep

LRS = [0.001, 0.003, 0.01, 0.03]


def _client(folder: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def _sweep_run(folder: Path, experiment: str):
    client = _client(folder)
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'")
    return parent


def test_budget_and_warm_start_are_checked_with_the_sweep() -> None:
    base = {"name": "b", "search_space": {"lr": {"uniform": [0.001, 0.01]}}}
    with pytest.raises(ConfigError) as caught:
        validate_sweep({**base, "tune": {"search": "random", "budget": {}, "warm_start": "a"}})
    assert "tune.budget: give device_hours or trial_epochs" in str(caught.value)
    assert "tune.warm_start: needs tune.search grid or optuna" in str(caught.value)
    sweep = validate_sweep({**base, "tune": {"search": "optuna", "warm_start": "a"}})
    assert sweep.tune.warm_start == ["a"]  # one name or a list


def test_a_device_hours_budget_stops_launching_when_the_next_trial_would_pass_it(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Twelve trials one at a time, a budget of 2 core-seconds (a trial takes 0.5 s on an idle
    machine, 7 s on a loaded one): the driver measures each trial's time and starts the next
    only while what was spent plus its expected cost (the mean trial so far) fits; the trials
    started are exactly those the measured times allowed, and fewer than twelve."""
    budget = 2 / 3600
    lrs = [round(0.001 * (i + 1), 3) for i in range(12)]
    sweep = write_sweep(
        tmp_path / "hours.yaml",
        synthetic_root,
        search_space={"lr": {"grid_search": lrs}},
        tune={"max_concurrent_trials": 1, "budget": {"device_hours": budget}},
    )
    proc = run(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parent = _sweep_run(tmp_path, "hours")
    assert parent.info.status == "FINISHED"
    started = trial_runs(tmp_path, "hours")
    assert all(r.info.status == "FINISHED" for r in started)  # the running trial finished
    # the spend after each trial ended, as the driver measured it (core-hours, cumulative)
    history = _client(tmp_path).get_metric_history(parent.info.run_id, BUDGET_SPENT_METRIC)
    spent = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(spent) == len(started) and 1 <= len(started) < len(lrs)
    assert all(b > a for a, b in zip([0.0, *spent], spent, strict=False)), spent
    for i, total in enumerate(spent[:-1], start=1):  # each next trial fitted when it started
        assert total + total / i <= budget
    last = len(spent)
    assert spent[-1] + spent[-1] / last > budget  # and the one after it did not
    reached = parent.data.tags[BUDGET_TAG]
    assert reached.startswith("reached:") and f"no new trial started after {last}" in reached
    assert f"budget: spent {spent[-1]:.4g} of {budget:g} core-hours (reached:" in proc.stdout
    # saved beside the searcher's state in Tune's experiment state: --resume goes on counting
    saved = json.loads((tmp_path / "ray" / "hours" / STATE_FILE).read_text())
    assert saved["reached"] == reached and len(saved["trials"]) == last and not saved["live"]


def test_an_added_experiments_budget_starts_from_what_the_sweep_run_records(
    tmp_path: Path,
) -> None:
    """The spend, its step and the reached tag of the sweep run are where the budget of trials
    `--accept-changes` adds starts: a reached budget starts none (no Ray started)."""
    from ray.tune.search import BasicVariantGenerator

    client = _client(tmp_path)
    parent = client.create_run(client.create_experiment("b")).info.run_id
    assert spent_before(client, parent) == Before()
    for step, value in ((2, 3.0), (1, 1.5)):
        client.log_metric(parent, BUDGET_SPENT_METRIC, value, step=step)
    assert spent_before(client, parent) == Before(3.0, 2)
    client.set_tag(parent, BUDGET_TAG, "reached: 3 trial-epochs")
    before = spent_before(client, parent)
    assert before == Before(3.0, 2, "reached: 3 trial-epochs")
    raw = {"name": "b", "search_space": {"lr": {"grid_search": LRS}}}
    sweep = validate_sweep({**raw, "tune": {"budget": {"trial_epochs": 4}}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    budget = Budget(BasicVariantGenerator(), sweep, 1, uri, parent, before)
    assert budget.spent() == 3.0 and budget.is_finished() and budget.next_trial() is None


@pytest.mark.launch  # a whole sweep or a server: make test-cluster (make test's 12 min)
def test_a_trial_epochs_budget(synthetic_root: Path, tmp_path: Path) -> None:
    """Two epochs a trial, five in the budget: two trials, each trained to its end."""
    sweep = write_sweep(
        tmp_path / "epochs.yaml",
        synthetic_root,
        search_space={"lr": {"grid_search": LRS[:3]}},
        tune={"max_concurrent_trials": 1, "budget": {"trial_epochs": 5}},
    )
    proc = run(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    started = trial_runs(tmp_path, "epochs")
    assert len(started) == 2
    assert all(steps(tmp_path, r.info.run_id) == [0, 1] for r in started)
    assert "budget: spent 4 of 5 trial-epochs (reached: 4 trial-epochs spent" in proc.stdout


@pytest.mark.launch  # a whole sweep or a server: make test-cluster (make test's 12 min)
def test_a_warm_grid_trains_only_the_new_configurations(
    synthetic_root: Path, tmp_path: Path
) -> None:
    first = write_sweep(tmp_path / "first.yaml", synthetic_root,
                        search_space={"lr": {"grid_search": LRS[:2]}})  # fmt: skip
    proc = run(first)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _sweep_run(tmp_path, "first").data.tags[DATASET_TAG] == fingerprint(synthetic_root)
    # an experiment on other data: skipped, with a line
    client = _client(tmp_path)
    other = start_sweep_run(client, "other", "other", "name: other\n")
    client.set_tag(other, DATASET_TAG, "3:0123456789abcdef")
    second = write_sweep(
        tmp_path / "second.yaml",
        synthetic_root,
        search_space={"lr": {"grid_search": LRS[:3]}},
        tune={"warm_start": ["first", "other"]},
    )
    proc = run(second, report=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warm start: experiment 'other' skipped: its sweeps ran on other data" in proc.stderr
    trained = trial_runs(tmp_path, "second")
    assert [r.data.params["lr"] for r in trained] == [str(LRS[2])]
    earlier = {r.info.run_id: r for r in trial_runs(tmp_path, "first")}
    reused = _sweep_run(tmp_path, "second").data.tags[REUSED_TAG].split(",")
    assert sorted(reused) == sorted(earlier)
    assert "reused from earlier sweeps (warm start): 2 run(s)" in proc.stdout
    page = Path(proc.stdout.strip().splitlines()[-1].removeprefix("report: ")).read_text()
    for run_id, r in earlier.items():
        assert f"  {r.info.run_name}: mIoU " in proc.stdout and f"run {run_id}" in proc.stdout
        assert f"Reused from an earlier sweep (warm start): {r.info.run_name} (" in page
        assert f"run {run_id}." in page  # its link: the run page on a tracking server


def _record_earlier(folder: Path, sweep_file: Path, data: Path) -> list[float]:
    """Twelve finished trials of an earlier TPE sweep on the same data, recorded in MLflow as
    segtune records them: the best mIoU near lr 0.02."""
    sweep = load_sweep(sweep_file)
    client = _client(folder)
    parent = start_sweep_run(client, "earlier", "earlier", "name: earlier\n")
    client.set_tag(parent, DATASET_TAG, fingerprint(data))
    lrs = [0.0001 * 1.6**i for i in range(12)]
    for i, lr in enumerate(lrs):
        cfg = resolve_trial(sweep, {"lr": lr})
        label = sweep.trial_label(cfg)
        trial = TrialRun.open(client, experiment="earlier", parent_run_id=parent, label=label,
                              config_label=label, trial_id=f"t{i}",
                              params=cfg.model_dump(mode="json"))  # fmt: skip
        miou = 0.6 - abs(lr - 0.02) * 10
        trial.log_epoch(1, {"val_miou": miou})  # the objective: its last epoch's, as Optuna saw
        trial.log_final({"best_val_miou": miou, "best_epoch": 1})
        trial.finish()
    client.set_terminated(parent, "FINISHED")
    return lrs


@pytest.mark.launch  # a whole sweep or a server: make test-cluster (make test's 12 min)
def test_a_warm_tpe_sweep_starts_from_what_earlier_sweeps_found(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Optuna is told the earlier trials before its first suggestion: with the same seed, the
    warm sweep's first trial is not the cold sweep's (TPE, past its random start-up trials)."""
    space = {"lr": {"loguniform": [0.0001, 0.1]}}
    tune = {"search": "optuna", "num_samples": 1}
    cold = write_sweep(tmp_path / "cold.yaml", synthetic_root, search_space=space, tune=tune)
    warm = write_sweep(tmp_path / "warm.yaml", synthetic_root, search_space=space,
                       tune={**tune, "warm_start": "earlier"})  # fmt: skip
    lrs = _record_earlier(tmp_path, warm, synthetic_root)
    for sweep in (cold, warm):
        proc = run(sweep)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reused from earlier sweeps (warm start): 12 run(s)" in proc.stdout
    (cold_trial,) = trial_runs(tmp_path, "cold")
    (warm_trial,) = trial_runs(tmp_path, "warm")
    assert cold_trial.data.params["lr"] != warm_trial.data.params["lr"]
    assert float(warm_trial.data.params["lr"]) not in lrs  # a new point, not one told
    assert len(_sweep_run(tmp_path, "warm").data.tags[REUSED_TAG].split(",")) == len(lrs)


@pytest.mark.launch  # a whole sweep killed and resumed: make test-cluster (make test's 12 min)
@pytest.mark.parametrize("search", ["optuna", "grid"])
def test_a_budgeted_sweep_killed_and_resumed_goes_on_counting(
    synthetic_root: Path, tmp_path: Path, search: str
) -> None:
    """Trials of EPOCHS epochs one at a time and a budget of three of them (plus a little): the
    driver is killed (SIGKILL to its process group) while the second trains; --resume ends the
    second, starts a third and stops there, at the budget that counts both drivers' epochs."""
    budget = 3 * EPOCHS + 2
    tune: dict[str, Any] = {"budget": {"trial_epochs": budget}}
    if search == "optuna":
        tune["num_samples"] = 6  # more than the budget pays for
        space = None
    else:
        space = {"lr": {"grid_search": [0.003, 0.002, 0.001, 0.0005, 0.0002]}}
    killed = Killed(tmp_path, synthetic_root, search, tune=tune, space=space)
    killed.kill({})
    wait_for(functools.partial(_group_gone, killed.pgid), "the killed driver's processes to end")
    parent = _sweep_run(tmp_path, "killed")
    before = _client(tmp_path).get_metric_history(parent.info.run_id, BUDGET_SPENT_METRIC)
    assert [(m.step, m.value) for m in before] == [(1, EPOCHS)]  # the first driver's trial
    proc = run(killed.sweep, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = trial_runs(tmp_path, "killed")
    assert len({r.data.tags[TRIAL_ID_TAG] for r in runs}) == len(runs) == 3
    for r in runs:  # each epoch trained once: the ended trial not again, the second resumed
        assert r.info.status == "FINISHED" and steps(tmp_path, r.info.run_id) == list(range(EPOCHS))
    assert set(killed.trials()) == {r.data.tags[TRIAL_ID_TAG] for r in runs}
    assert {status for status, _ in killed.trials().values()} == {"TERMINATED"}
    parent = _sweep_run(tmp_path, "killed")
    assert parent.info.status == "FINISHED"
    history = _client(tmp_path).get_metric_history(parent.info.run_id, BUDGET_SPENT_METRIC)
    spent = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
    assert spent == [(1, EPOCHS), (2, 2 * EPOCHS), (3, 3 * EPOCHS)]  # on from the first's
    reached = parent.data.tags[BUDGET_TAG]
    assert reached.startswith("reached:") and "no new trial started after 3" in reached
    assert f"budget: spent {3 * EPOCHS} of {budget} trial-epochs (reached:" in proc.stdout


@pytest.mark.launch  # a whole sweep killed and resumed: make test-cluster (make test's 12 min)
def test_a_sweep_killed_after_its_budget_was_reached_resumes_its_running_trial(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Two slots, a budget of one trial and a bit: the budget refuses the second trial Optuna
    made (its study knows it, Ray's trials do not) while the first trains. Killed then,
    --resume takes the searcher's state as it is, ends the first trial and starts no other."""
    budget = EPOCHS + 2
    tune = {"num_samples": 4, "max_concurrent_trials": 2, "budget": {"trial_epochs": budget}}
    killed = Killed(tmp_path, synthetic_root, "optuna", tune=tune)

    def reached_while_running() -> str | None:
        try:
            state = json.loads(killed.read(STATE_FILE))
        except (FileNotFoundError, ValueError):
            return None
        running = [path for status, path in killed.trials().values() if status == "RUNNING"]
        return running[0] if state["reached"] and state["live"] and running else None

    killed.kill({}, until=reached_while_running)
    wait_for(functools.partial(_group_gone, killed.pgid), "the killed driver's processes to end")
    proc = run(killed.sweep, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (trial,) = trial_runs(tmp_path, "killed")
    assert trial.info.status == "FINISHED"
    assert steps(tmp_path, trial.info.run_id) == list(range(EPOCHS))
    parent = _sweep_run(tmp_path, "killed")
    history = _client(tmp_path).get_metric_history(parent.info.run_id, BUDGET_SPENT_METRIC)
    assert [(m.step, m.value) for m in history] == [(1, EPOCHS)]
    assert "no new trial started after 1" in parent.data.tags[BUDGET_TAG]
    assert f"budget: spent {EPOCHS} of {budget} trial-epochs (reached:" in proc.stdout


@pytest.mark.launch  # three drivers in turn: make test-cluster (make test's 12 min)
def test_trials_that_accept_changes_adds_share_the_sweeps_budget(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """One epoch a trial, two in the budget: the sweep trains its one trial; an edit adding two
    trains one of them (the sweep's spend counts) and reaches the budget; a later edit adding
    one more trains nothing and says so. The spend goes on in the sweep run's one metric."""
    sweep = write_sweep(
        tmp_path / "added_b.yaml",
        synthetic_root,
        train={"epochs": 1},
        search_space={"lr": {"grid_search": LRS[:1]}},
        tune={"max_concurrent_trials": 1, "budget": {"trial_epochs": 2}},
    )
    proc = run(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert BUDGET_TAG not in _sweep_run(tmp_path, "added_b").data.tags

    def edit(lrs: list[float]) -> str:
        raw = yaml.safe_load(sweep.read_text())
        raw["search_space"]["lr"]["grid_search"] = lrs
        sweep.write_text(yaml.safe_dump(raw))
        proc = run(sweep, "--resume", "--accept-changes")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    out = edit(LRS[:3])
    assert len(trial_runs(tmp_path, "added_b")) == 2
    parent = _sweep_run(tmp_path, "added_b")
    reached = parent.data.tags[BUDGET_TAG]
    assert reached.startswith("reached: 2 trial-epochs spent") and "after 2" in reached
    history = _client(tmp_path).get_metric_history(parent.info.run_id, BUDGET_SPENT_METRIC)
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0)]
    assert "budget: spent 2 of 2 trial-epochs (reached: 2 trial-epochs spent" in out

    out = edit(LRS)
    assert len(trial_runs(tmp_path, "added_b")) == 2
    assert (
        "--accept-changes: the trials added are not trained: the sweep's budget was reached: "
        "2 trial-epochs spent" in out
    )
    assert _sweep_run(tmp_path, "added_b").data.tags[BUDGET_TAG] == reached
