"""The sweep engine on a real local Ray and a real MLflow store (sqlite).

Each test runs `python -m segtune.run` as a user would, then reads MLflow back.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from segtune.config.names import (
    CONFIG_LABEL_TAG,
    COST_EXPERIMENT,
    COST_TAG_PREFIX,
    EPOCH_METRICS,
    ERROR_TAG,
    LABEL_TAG,
    ROLE_TAG,
    TRIAL_ID_TAG,
    WORKER_TAG,
)
from segtune.run import main as run_main
from segtune.sweep.cost_stage import MAX_CV
from segtune.tracking.costs import NOISY_TAG
from segtune.tracking.runs import TrialRun, finished_metrics, start_sweep_run
from segtune.training.baseline import colour_baseline
from tests.helpers import start_driver, wait_for

TINY_TRAIN = {
    "epochs": 2,
    "batch_size": 4,
    "image_size": 64,
    "unet_min_channels": 4,
    "unet_max_channels": 16,
    "unet_depth": 2,
    "lr": 0.003,
}
BENCH = {"input": "96x64", "threads": 1, "repeats": 2, "warmup": 1}


def write_sweep(path: Path, data_root: Path, **sections: Any) -> Path:
    sweep = {
        "name": path.stem,
        "data": {"root": str(data_root)},
        "train": dict(TINY_TRAIN),
        "tune": {"resources_per_trial": {"cpu": 1}, "storage_path": str(path.parent / "ray")},
        "bench": BENCH,
    }
    for key, value in sections.items():
        sweep[key] = {**sweep.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(sweep))
    return path


def run(
    sweep: Path,
    *args: str,
    env: dict[str, str] | None = None,
    report: bool = False,
    **kwargs: Any,
):
    uri = f"sqlite:///{sweep.parent / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", uri, *args]
    if not report:
        cmd.append("--no-report")
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=sweep.parent,
        env={**os.environ, **(env or {})},
        timeout=420,
        **kwargs,
    )


def trial_runs(folder: Path, experiment: str) -> list[Any]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")


def steps(folder: Path, run_id: str, key: str = "val_miou") -> list[int]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_sweep_contract_failure_and_retry(synthetic_root: Path, tmp_path: Path) -> None:
    """Three trials: one diverges (FAILED, error tag, exit 1), and every other trial dies once
    after its first epoch (a test hook) and is retried from its Ray checkpoint into its own run."""
    sweep = write_sweep(
        tmp_path / "contract.yaml",
        synthetic_root,
        search_space={
            "model": {
                "grid_search": [
                    {"arch": "unet", "backbone": "none"},
                    {"arch": "deeplabv3", "backbone": "mobilenet_v3_small"},
                    {"arch": "unet", "backbone": "none", "lr": 1.0e6, "scheduler": "none"},
                ]
            }
        },
        tune={"max_failures": 1, "max_concurrent_trials": 2},
    )
    env = {"SEGTUNE_FAULT_AFTER_EPOCH": "0", "SEGTUNE_FAULT_MARKER": str(tmp_path / "faults")}
    proc = run(sweep, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "FAILED unet-none-basic-lr=1e+06-scheduler=none" in proc.stdout
        and "TrainingDiverged" in proc.stdout
    )
    assert "mlflow ui --backend-store-uri" in proc.stdout
    # what the user watched: Ray's trials by their labels in the progress table (the two that
    # start first are in any table) and in Ray's error (with the trial's traceback), and none
    # of MLflow's INFO lines (those come with -v)
    first = r"unet-none-basic-lr=0\.003-scheduler=poly|deeplabv3-mobilenet_v3_small-aspp-basic"
    assert re.search(rf"^({first})\S* +[A-Z]+ +\d/2 ", proc.stdout, re.M), proc.stdout
    diverged = "unet-none-basic-lr=1e+06-scheduler=none"
    assert f"Trial task failed for trial {diverged}" in proc.stderr, proc.stderr[-3000:]
    assert "TrainingDiverged: " in proc.stderr  # the trial's own traceback
    assert "run_trial_" not in proc.stdout + proc.stderr
    assert "INFO mlflow" not in proc.stdout + proc.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("contract")
    # the MLflow UI opens it on its runs, and the summary says where they are
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"then http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs" in proc.stdout
    parents = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'")
    assert f"parentRunId%20%3D%20%27{parents[0].info.run_id}%27" in proc.stdout  # its trials
    # the colour-only floor of the validation split (test, here), computed once by the driver
    floor = colour_baseline(synthetic_root, "test")["miou"]
    assert parents[0].data.metrics["floor_miou"] == pytest.approx(floor)
    assert (
        f"colour-only floor of the validation split (nearest mean training colour): mIoU {floor:.3f}"
        in proc.stdout
    )
    assert len(parents) == 1
    assert [a.path for a in client.list_artifacts(parents[0].info.run_id)] == ["sweep.yaml"]
    runs = trial_runs(tmp_path, "contract")
    assert len(runs) == 3, "one MLflow run per trial, retries included"
    assert len({r.data.tags[TRIAL_ID_TAG] for r in runs}) == 3
    # Ray's folder of each trial: its label, then its trial id
    folders = {p.name for p in (tmp_path / "ray" / "contract").iterdir()}
    assert {f"{r.info.run_name}_{r.data.tags[TRIAL_ID_TAG]}" for r in runs} <= folders, folders
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and "TrainingDiverged" in failed[0].data.tags[ERROR_TAG]
    assert failed[0].data.params["lr"] == "1000000.0"

    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 2
    assert len(list((tmp_path / "faults").iterdir())) >= 2  # each of them died once
    for r in finished:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["segtune.node"] and r.data.params["arch"] in ("unet", "deeplabv3")
        assert r.data.tags[CONFIG_LABEL_TAG] == r.data.tags[LABEL_TAG] == r.info.run_name
        # it died once and was retried: a second attempt, and no error left from the first
        assert r.data.tags["segtune.attempts"] == "2" and ERROR_TAG not in r.data.tags
        for key in EPOCH_METRICS:
            assert steps(tmp_path, r.info.run_id, key) == [0, 1], key  # each epoch exactly once
        m = r.data.metrics
        # MLflow's system metrics, sampled while the trial ran; no GPU here, so no GPU figure
        assert m["system/cpu_utilization_percentage"] >= 0
        assert m["system/system_memory_usage_megabytes"] > 0
        assert not any(key.startswith("system/gpu") for key in m)
        assert 0.0 <= m["best_val_miou"] <= 1.0 and m["best_epoch"] in (0, 1)
        for key in (
            "train_time_min",
            "params_m",
            "size_mb",
            "gflops",
            "infer_ms_cpu",
            "train_img_s",
        ):
            assert m[key] > 0 and math.isfinite(m[key]), key
        assert (
            "infer_ms_gpu" not in m
            and "no" in r.data.tags[COST_TAG_PREFIX + "gpu_skip_reason"].lower()
        )
        eval_files = {a.path for a in client.list_artifacts(r.info.run_id, "eval")}
        assert {"eval/per_image.csv", "eval/confusion.csv", "eval/examples"} <= eval_files
        # the boundary band's confusion: a part of the split's pixels, its mIoU on the run
        assert 0.0 <= m["best_boundary_miou"] <= 1.0
        pixels = {}
        for name in ("confusion.csv", "boundary_confusion.csv"):
            path = client.download_artifacts(r.info.run_id, f"eval/{name}", str(tmp_path))
            pixels[name] = pd.read_csv(path, index_col=0).to_numpy().sum()
        assert 0 < pixels["boundary_confusion.csv"] < pixels["confusion.csv"]
        examples = [a.path for a in client.list_artifacts(r.info.run_id, "eval/examples")]
        assert any("/best_1_" in p for p in examples) and any(
            "/class_grass_" in p for p in examples
        )
        best = client.download_artifacts(
            r.info.run_id, "checkpoints/best.pt", str(tmp_path / r.info.run_id)
        )
        import torch

        ckpt = torch.load(best, weights_only=True)
        assert ckpt["config"]["arch"] == r.data.params["arch"]
        assert ckpt["metrics"]["best_val_miou"] == pytest.approx(m["best_val_miou"])


def test_asha_stops_weak_trials(synthetic_root: Path, tmp_path: Path) -> None:
    sweep = write_sweep(
        tmp_path / "asha.yaml",
        synthetic_root,
        train={"epochs": 3},
        search_space={"lr": {"grid_search": [0.01, 1.0e-7, 1.0e-7]}},
        tune={
            "scheduler": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
            "max_concurrent_trials": 1,
        },
    )
    proc = run(sweep, report=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the report, built by its own command at the end of the sweep, on disk and in MLflow
    index = Path(proc.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert index == tmp_path / "reports" / "asha" / "index.html" and index.is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("asha").experiment_id
    parent = client.search_runs([experiment], f"tags.`{ROLE_TAG}` = 'sweep'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/index.html" in logged
    runs = trial_runs(tmp_path, "asha")
    epochs = {r.info.run_id: len(steps(tmp_path, r.info.run_id)) for r in runs}
    assert len(runs) == 3 and max(epochs.values()) == 3
    # one slot: a later trial ran in the worker process an earlier one freed (reuse_actors)
    workers = [r.data.tags[WORKER_TAG] for r in runs]
    assert len(set(workers)) < len(workers), workers
    stopped = [r for r in runs if "segtune.early_stopped" in r.data.tags]
    assert stopped, f"ASHA stopped nothing: {epochs}"
    for r in stopped:
        assert epochs[r.info.run_id] < 3 and r.info.status == "FINISHED"
        assert r.data.params["lr"] == "1e-07"
        assert r.data.tags["segtune.early_stopped"] == f"after {epochs[r.info.run_id]} epochs"
        # closed with the summary of the epochs it ran, as the trial itself computed it
        miou = client.get_metric_history(r.info.run_id, "val_miou")
        times = client.get_metric_history(r.info.run_id, "epoch_time_s")
        assert r.data.metrics["best_val_miou"] == max(m.value for m in miou)
        assert r.data.metrics["train_time_min"] == pytest.approx(sum(m.value for m in times) / 60)


@pytest.mark.parametrize(
    "sampler",
    ["tpe", pytest.param("nsga2", marks=pytest.mark.launch)],  # 40 s: make test-cluster
)
def test_optuna_sweeps(synthetic_root: Path, tmp_path: Path, sampler: str) -> None:
    tune: dict[str, Any] = {"search": "optuna", "sampler": sampler, "num_samples": 3}
    if sampler == "nsga2":  # multi-objective: quality against CPU latency
        tune.update(metric=["val_miou", "infer_ms_cpu"], mode=["max", "min"])
    sweep = write_sweep(
        tmp_path / f"opt_{sampler}.yaml",
        synthetic_root,
        train={"epochs": 1},
        search_space={
            "lr": {"loguniform": [0.0001, 0.01]},
            "unet_min_channels": {"choice": [2, 4]},
        },
        tune=tune,
    )
    proc = run(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = trial_runs(tmp_path, f"opt_{sampler}")
    assert len(runs) == 3
    lrs = {float(r.data.params["lr"]) for r in runs}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    # the summary's rows: the Pareto column, then the note (these tiny trials are under the floor)
    table = [line for line in proc.stdout.splitlines() if re.search(r" (True|False)\b", line)]
    assert len(table) == 3 and any(" True" in line for line in table)


EPOCHS_KEPT_RUNNING = 30  # tiny epochs take a fraction of a second: 30 keep a trial running


def _sweep_runs(folder: Path, name: str) -> list[Any]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'")


def _training(
    folder: Path, name: str, finished: int, before: dict[str, int], saved: bool = False
) -> Any:
    """The RUNNING trial run once `finished` trials have ended and it has logged more epochs
    than `before` holds for it, and (`saved`) once the state Tune saves in the background
    names it. Not `saved` for a signal: Tune's graceful stop saves its state itself, and
    every epoch waited for is one fewer left to train when the signal lands."""

    def training() -> Any:
        runs = trial_runs(folder, name)
        done = [r for r in runs if r.info.status == "FINISHED"]
        running = [r for r in runs if r.info.status == "RUNNING"]
        if len(done) >= finished and running:
            run_ = running[0]
            if len(steps(folder, run_.info.run_id)) > before.get(run_.info.run_id, 0) and (
                not saved or _in_saved_state(folder / "ray" / name, run_.data.tags[TRIAL_ID_TAG])
            ):
                return run_
        return None

    return wait_for(training, f"{finished} finished trials and one training", every=0.5)


def _in_saved_state(experiment: Path, trial_id: str) -> bool:
    """Whether the newest state Tune saved (in the background, every TUNE_GLOBAL_CHECKPOINT_S)
    names the trial: both the trials' file and the grid's, which a resume reads (the newest
    of each by name). A state from before the trial began leaves the resumed grid waiting for
    a trial it cannot generate again (see test_cluster's in_saved_state)."""
    for kind in ("experiment_state", "basic-variant-state"):
        newest = max(experiment.glob(f"{kind}-*.json"), default=None)
        if newest is None or trial_id.encode() not in newest.read_bytes():
            return False
    return True


def test_a_finished_run_gives_its_result_and_is_not_reopened(tmp_path: Path) -> None:
    """Ray's state is saved in the background, so a resumed sweep may restart a trial that had
    finished; the trial then reports its run's final metrics (segtune.sweep.trainable) and runs nothing."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = start_sweep_run(client, "done", "done", "name: done\n")
    run = TrialRun.open(
        client,
        experiment="done",
        parent_run_id=parent,
        label="unet",
        config_label="unet",
        trial_id="t0",
        params={"arch": "unet"},
    )
    run.log_epoch(0, {"train_loss": 1.5, "val_miou": 0.25})
    assert finished_metrics(client, run.run_id) is None  # RUNNING: it goes on training
    run.log_final({"best_val_miou": 0.25, "best_epoch": 0, "size_mb": 1.5, "setup_s": 3.0})
    run.finish()
    assert finished_metrics(client, run.run_id) == {  # not setup_s: no result of the trial
        "train_loss": 1.5,
        "val_miou": 0.25,
        "best_val_miou": 0.25,
        "best_epoch": 0,
        "size_mb": 1.5,
    }
    client.set_terminated(run.run_id, "KILLED")  # an interrupted trial is continued
    assert finished_metrics(client, run.run_id) is None


@pytest.mark.launch  # 90 s of drivers started and stopped: run by make test-cluster, and CI
def test_interrupted_killed_and_resumed_sweeps_leave_a_true_record(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT to the process group), then SIGTERM to a resumed driver alone: the trial
    stops, its run and the sweep run become KILLED with the signal, the --resume command is
    printed, exit 130 and 143. SIGKILL of a resumed driver closes nothing: the
    next --resume closes what it left RUNNING, and finishes the sweep: one run per trial, every
    epoch logged once, the lock released."""
    sweep = write_sweep(
        tmp_path / "resume.yaml",
        synthetic_root,
        train={"epochs": EPOCHS_KEPT_RUNNING},
        search_space={"lr": {"grid_search": [0.003, 0.002]}},
        tune={"max_concurrent_trials": 1},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    cmd = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", uri, "--no-report"]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}

    def stop(
        signum: int, *extra: str, finished: int = 0, group: bool = False
    ) -> tuple[int, str, Any, int]:
        """Start a driver, signal it (or its whole process group, as Ctrl-C in a terminal does)
        as soon as a trial has trained an epoch (a SIGKILL once Tune's saved state names it,
        as nothing is saved after it); exit status, output, that trial, its epochs then."""
        epochs = {
            r.info.run_id: len(steps(tmp_path, r.info.run_id))
            for r in trial_runs(tmp_path, "resume")
        }
        # output to a file: an undrained pipe would block the driver's logging, and its signals
        driver = start_driver([*cmd, *extra], tmp_path / "driver.log", tmp_path, env)
        try:
            trial = _training(tmp_path, "resume", finished, epochs, signum == signal.SIGKILL)
            trained = len(steps(tmp_path, trial.info.run_id))
            if group:  # Ray's processes that share the group get it too
                os.killpg(driver.pid, signum)
            else:  # to the driver alone, as `kill` sends it
                driver.send_signal(signum)
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
            if signum == signal.SIGKILL:  # its Ray and trial processes too
                os.killpg(driver.pid, signal.SIGKILL)
        return driver.returncode, (tmp_path / "driver.log").read_text(), trial, trained

    resume = f"continue it with: {sys.executable} -m segtune.run {sweep} --resume --tracking-uri {uri} --no-report"
    # Ctrl-C in a terminal, then SIGTERM to the resumed driver alone
    for signum, extra, group in ((signal.SIGINT, (), True), (signal.SIGTERM, ("--resume",), False)):
        code, out, trial, trained = stop(signum, *extra, group=group)
        assert trained < EPOCHS_KEPT_RUNNING  # signalled with epochs left to train
        name = signal.Signals(signum).name
        assert code == 128 + signum, out[-3000:]
        last = out.strip().splitlines()[-1]
        run_ = client.get_run(trial.info.run_id)
        logged = steps(tmp_path, trial.info.run_id)
        if run_.info.status == "FINISHED":
            # the trial trains on until Tune's stop reaches it (Ray's race: unbounded on a
            # stalled machine); it ended first, whole
            assert logged == list(range(EPOCHS_KEPT_RUNNING)), logged
            killed = 1  # the sweep run alone
        else:  # the trial's run and the sweep run
            assert run_.info.status == "KILLED" and name in run_.data.tags["segtune.stopped"]
            killed = 2
        assert f"stopped by {name}" in last and f"{killed} run(s) closed as KILLED" in last, last
        assert resume in last
        (parent,) = _sweep_runs(tmp_path, "resume")
        assert parent.info.status == "KILLED" and name in parent.data.tags["segtune.stopped"]

    code, _, trial, _ = stop(signal.SIGKILL, "--resume", finished=1)
    assert client.get_run(trial.info.run_id).info.status == "RUNNING"  # nobody closed it
    assert [r.info.run_id for r in _sweep_runs(tmp_path, "resume")] == [parent.info.run_id]

    proc = run(sweep, "--resume")
    assert "closed 2 run(s) an earlier driver of this sweep left RUNNING" in proc.stderr
    runs = trial_runs(tmp_path, "resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert steps(tmp_path, r.info.run_id) == list(range(EPOCHS_KEPT_RUNNING))
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "segtune.stopped" not in parent.data.tags
    assert all("segtune.stopped" not in r.data.tags for r in runs)  # resumed: no longer stopped
    assert not (tmp_path / "ray" / "resume" / "segtune.lock").exists()  # released at the end


@pytest.mark.parametrize(
    "moment",
    [
        "cost 1/3",  # the driver times the networks (before Ray; 3 timings of a second or so)
        pytest.param("starting Ray", marks=pytest.mark.launch),  # Ray's own handler is set then
    ],
)
def test_sigterm_before_the_trials_stops_at_once(
    synthetic_root: Path, tmp_path: Path, moment: str
) -> None:
    """SIGTERM before the trials (while the networks are timed, or while Ray starts): exit 143
    at once, no --resume offered, since there is nothing to resume, and no Ray process left."""
    sweep = write_sweep(
        tmp_path / "term.yaml",
        synthetic_root,
        search_space={"unet_min_channels": {"grid_search": [4, 6, 8]}},
        bench={"input": "512x384", "repeats": 5},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", uri, "--no-report"]
    log = tmp_path / "driver.log"
    driver = start_driver(cmd, log, tmp_path)
    try:
        wait_for(lambda: moment in log.read_text(), repr(moment), process=driver, log=log)
        if moment == "starting Ray":  # inside ray.init: Ray's first process, the rest to come
            wait_for(
                lambda: _ray_processes(driver.pid),
                "Ray's first process",
                process=driver,
                log=log,
                every=0.05,
            )
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    out = log.read_text()
    assert driver.returncode == 143, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last and "Tune saved no state to resume" in last, last
    assert "--resume" not in last and "Traceback" not in out
    assert not trial_runs(tmp_path, "term")
    wait_for(  # Ray's own processes go with their driver: in seconds, 60 on a busy machine
        lambda: not _ray_processes(driver.pid),
        lambda: f"the end of {[p.cmdline()[:2] for p in _ray_processes(driver.pid)]}",
        timeout=60,
    )


def _ray_processes(started_by: int) -> set[psutil.Process]:
    """Ray's node processes (the GCS, raylets) of the Ray that the process `started_by` started
    (Ray names its session after that process's id), not every Ray of this machine: other
    tests may start and stop theirs meanwhile."""
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] in ("gcs_server", "raylet") and any(
            arg.startswith("--session-name=") and arg.endswith(f"_{started_by}")
            for arg in proc.info["cmdline"] or ()
        ):
            found.add(proc)
    return found


@pytest.mark.launch  # a killed process again: make test-cluster, and CI
def test_a_trial_whose_process_dies_is_failed_with_the_error_not_a_path(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """The trial's worker process is killed outright (it cannot tag its own run) and no retry is
    left: the driver closes the run FAILED with Ray's message, not the path of Ray's error file."""
    sweep = write_sweep(
        tmp_path / "dies.yaml",
        synthetic_root,
        train={"epochs": EPOCHS_KEPT_RUNNING},
        tune={"max_failures": 0},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", uri, "--no-report"]
    driver = start_driver(cmd, tmp_path / "driver.log", tmp_path)
    try:
        trial = _training(tmp_path, "dies", 0, {})
        workers = [p for p in psutil.Process(driver.pid).children(recursive=True)
                   if "ImplicitFunc" in " ".join(p.cmdline())]  # fmt: skip
        assert len(workers) == 1, [p.cmdline() for p in workers]
        workers[0].kill()  # the trial's own process, found among the driver's descendants
        driver.wait(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 1, (tmp_path / "driver.log").read_text()[-3000:]
    run_ = MlflowClient(uri).get_run(trial.info.run_id)
    error = run_.data.tags[ERROR_TAG]
    assert run_.info.status == "FAILED" and "error.txt" not in error and "/" not in error, error
    assert "died" in error, error


BAD_SWEEPS = {
    "unknown key": ({"train": {"epochz": 2}}, "train.epochz"),
    "wrong type": ({"train": {"lr": "fast"}}, "train.lr"),
    "unknown backbone": ({"search_space": {"arch": "deeplabv3", "backbone": "resnet9"}}, "resnet9"),
    "impossible combination": (
        {"search_space": {"arch": {"grid_search": ["unet", "deeplabv3"]}, "backbone": "none"}},
        "arch=deeplabv3",
    ),
    "missing dataset": ({"data": {"root": "/nonexistent/floodnet"}}, "/nonexistent/floodnet"),
    "missing weights": (
        {"train": {"pretrained": "/nonexistent/w.pt"}},
        "train.pretrained=none): pretrained: /nonexistent/w.pt (no such file)",
    ),
    "gpu on this machine": ({"tune": {"resources_per_trial": {"gpu": 1}}}, "no GPU"),
    "a name that is a folder": ({"name": ".."}, "name: Value error, '..' names a folder"),
    "a size that is not one": ({"bench": {"input": "96by64"}}, "bench.input"),
    "a book as description": ({"description": "x" * 100_000}, "description: String should have"),
    # a GPU latency is timed only for trials with a GPU: no constraint on what nobody measures
    "a constraint nobody can measure": (
        {"tune": {"constraints": {"infer_ms_gpu": "<=5"}}},
        "tune.constraints.infer_ms_gpu: no GPU latency is measured on this sweep's nodes "
        "(tune.resources_per_trial.gpu is 0)",
    ),
    "a constraint on a cost known after training only": (
        {"tune": {"constraints": {"train_time_min": "<=5"}}},
        "tune.constraints.train_time_min: not a cost the cost stage measures before training",
    ),
    "a constraint that cannot be read": (
        {"tune": {"constraints": {"size_mb": "at most 30"}}},
        "tune.constraints.size_mb: cannot read 'at most 30'; expected an operator",
    ),
    "asha on no score": (
        {"train": {"epochs": 3}, "tune": {"scheduler": "asha", "metric": "lr", "mode": "min"}},
        "asha needs a per-epoch metric, not lr",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SWEEPS))
def test_bad_sweeps_exit_2_before_anything_starts(
    case: str, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray
    import torch

    if case == "gpu on this machine" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    sections, expected = BAD_SWEEPS[case]
    before = _ray_processes(os.getpid())  # an earlier test's, in this process
    sweep = write_sweep(tmp_path / "bad.yaml", synthetic_root, **sections)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from segtune.cli import run_cli

    code = run_cli(run_main, [str(sweep), "--tracking-uri", uri, "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # one line, a single problem's too
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run, not even a store
    wait_for(  # Ray, started beside the pre-flight, went with it
        lambda: not _ray_processes(os.getpid()) - before,
        lambda: f"the end of {[p.cmdline()[:2] for p in _ray_processes(os.getpid()) - before]}",
        timeout=60,
    )


def test_bad_yaml_from_the_command_line(tmp_path: Path) -> None:
    sweep = tmp_path / "broken.yaml"
    sweep.write_text("name: x\ntrain: {epochs: [1\n")
    proc = run(sweep)
    assert (
        proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr
    )


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://127.0.0.1:9", "no answer within 5 s"),
        ("foo://bar", "MLflow has no store for foo://"),
        ("sqlite:////proc/version/mlflow.db", "/proc/version is a file, not a folder"),
        ("mssql://u@127.0.0.1:9/db", "its database driver is not installed"),
        ("http://[::1", "not a valid address (Invalid IPv6 URL)"),
    ],
)
@pytest.mark.timeout(120)  # refused, not retried: MLflow's HTTP retries would take minutes
def test_a_tracking_uri_that_cannot_work_is_refused_at_once(
    uri: str,
    expected: str,
    synthetic_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ray

    from segtune.cli import run_cli

    sweep = write_sweep(tmp_path / "uri.yaml", synthetic_root)
    code = run_cli(run_main, [str(sweep), "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not ray.is_initialized()
    # the report, started with the sweep, went with it
    left = [p.cmdline() for p in psutil.Process().children(recursive=True)]
    assert not [c for c in left if "dashboards.report" in c], left


def test_the_early_report_runs_at_the_lowest_priority_and_goes_with_the_sweep(
    tmp_path: Path,
) -> None:
    """The report's process imports on the CPU the pre-flight, Ray and the trials leave idle
    (nice 19), and a sweep that ends before drawing it kills it."""
    from segtune.sweep.report_process import EarlyReport

    with EarlyReport("nothing", f"sqlite:///{tmp_path / 'mlflow.db'}") as report:
        assert os.getpriority(os.PRIO_PROCESS, report.process.pid) == 19
    assert report.process.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("auto", "error: --address auto: Could not find any running Ray instance"),
        # loopback only: nothing listens on port 9 (discard); Ray would retry for a minute
        ("127.0.0.2:9", "error: --address 127.0.0.2:9: no Ray head answers there (Connection"),
    ],
)
@pytest.mark.timeout(120)  # not Ray's minute of retries, which a wrong line also shows
def test_a_cluster_that_cannot_be_joined_is_one_line(
    address: str,
    expected: str,
    synthetic_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray starts while the pre-flight runs: a cluster that cannot be joined ends in one line
    and exit 2 within seconds, its pre-flight thread and its report gone with it."""
    import ray

    from segtune.cli import run_cli

    if address == "auto" and Path("/tmp/ray/ray_current_cluster").exists():
        pytest.skip("a Ray cluster of this machine answers --address auto")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = write_sweep(tmp_path / "join.yaml", synthetic_root)
    code = run_cli(run_main, [str(sweep), "--tracking-uri", uri, "--address", address])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the pre-flight's progress bars
    assert code == 2 and "Traceback" not in err and err.count("error: ") == 1, err
    assert last.startswith(expected), err
    if address != "auto":  # refused before the pre-flight reads a single pair
        assert "pairs" not in err, err
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("pre-flight")]
    left = [p.cmdline() for p in psutil.Process().children(recursive=True)]
    assert not [c for c in left if "dashboards.report" in c], left


def test_an_unfinished_set_value_and_a_missing_resume_are_one_line(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from segtune.cli import run_cli

    sweep = write_sweep(tmp_path / "setbad.yaml", synthetic_root)
    code = run_cli(run_main, [str(sweep), "--dry-run", "--set", "train.lr=[1,"])
    err = capsys.readouterr().err
    assert code == 2 and "--set 'train.lr=[1,': the value is not valid YAML" in err
    assert len(err.strip().splitlines()) == 1
    from segtune.train import main as train_main

    args = ["--data", str(synthetic_root), "--out", str(tmp_path / "none"), "--resume"]
    assert run_cli(train_main, args) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: --resume: no file '{tmp_path / 'none' / 'last.pt'}'"
    args = ["--data", str(synthetic_root), "--out", str(tmp_path / "e0"), "--epochs", "0"]
    assert run_cli(train_main, args) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "error: invalid trial configuration: epochs: Input should be greater than or equal to 1"
    )
    args = ["--data", str(synthetic_root), "--out", str(tmp_path / "t"), "--device", "tpu"]
    assert run_cli(train_main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --device tpu: not a device; use auto, cpu, cuda or cuda:N"
    (tmp_path / "taken").write_text("mine")
    args = ["--data", str(synthetic_root), "--out", str(tmp_path / "taken")]
    assert run_cli(train_main, args) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"error: --out {tmp_path / 'taken'}: {tmp_path / 'taken'} is a file, not a folder"
    )


def test_dry_run_lists_the_grid(synthetic_root: Path, tmp_path: Path) -> None:
    sweep = write_sweep(
        tmp_path / "dry.yaml",
        synthetic_root,
        search_space={
            "model": {
                "grid_search": [
                    {"arch": "unet", "backbone": "none"},
                    {"arch": "deeplabv3", "backbone": "resnet18"},
                ]
            },
            "augment": {"grid_search": ["none", "basic"]},
        },
        tune={"repeats": 2},
    )
    proc = run(sweep, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "8 trials" in proc.stdout and "deeplabv3-resnet18-aspp-none" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.launch  # a whole sweep or a server: make test-cluster (make test's 12 min)
def test_cost_is_timed_once_per_architecture_and_alone(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Two architectures x 3 seeds, two trials at once on 2 cores: the cost stage times each
    architecture once, before the trials (counted from the cost runs); every trial run carries
    that cost; each timing records its spread, and is marked noisy where it is over 10%."""
    bench = {"input": "320x240", "threads": 1, "repeats": 5, "warmup": 2}
    models = [
        {"arch": "deeplabv3", "backbone": backbone, "aspp": True}
        for backbone in ("mobilenet_v3_small", "resnet18")
    ]
    sweep = write_sweep(
        tmp_path / "costs.yaml",
        synthetic_root,
        train={"epochs": 1},
        search_space={"model": {"grid_search": models}},
        tune={"repeats": 3, "max_concurrent_trials": 2},
        bench=bench,
    )
    proc = run(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    costs = client.get_experiment_by_name(COST_EXPERIMENT)
    timed = {r.info.run_id: r for r in client.search_runs([costs.experiment_id])}
    assert len(timed) == 2, "one timing per architecture, not per trial"
    runs = trial_runs(tmp_path, "costs")
    assert len(runs) == 6
    for r in runs:
        tags = r.data.tags
        assert tags[f"{COST_TAG_PREFIX}source"] == "measured"  # by this sweep's cost stage
        source = timed[tags[f"{COST_TAG_PREFIX}run_id"]]
        for key in ("params_m", "size_mb", "gflops", "infer_ms_cpu"):
            assert r.data.metrics[key] == pytest.approx(source.data.metrics[key]), key
        assert tags[f"{COST_TAG_PREFIX}bench_threads"] == "1"
        assert float(tags[f"{COST_TAG_PREFIX}other_cores"]) >= 0
    # each timing with its steadiness; a figure is never asserted (it moves with the machine)
    for cost in timed.values():
        cv = float(cost.data.tags[f"{COST_TAG_PREFIX}cpu_cv"])
        assert cv >= 0 and (cv <= MAX_CV or NOISY_TAG in cost.data.tags), cost.data.tags
    # the time account, printed and kept on the sweep's run
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"]).data.metrics
    assert parent["time/slots"] == 2 and 0 < parent["time/efficiency"] <= 1
    assert parent["time/train_s"] == pytest.approx(
        sum(r.data.metrics["train_time_min"] * 60 for r in runs)
    )
    assert "of the slot time" in proc.stdout


@pytest.mark.launch  # three drivers in turn, about 90 s: make test-cluster, and CI
def test_an_edited_sweep_is_refused_or_its_new_trials_added_on_resume(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """A finished sweep whose lr grid gains 0.01: `--resume` refuses in one line naming the key
    (no run starts); `--resume --accept-changes` runs exactly the new trial under the same sweep
    run, the description edit with it accepted with a note; a later `--resume` of the edited
    file runs nothing again."""
    sweep = write_sweep(
        tmp_path / "edited.yaml",
        synthetic_root,
        train={"epochs": 1},
        search_space={"lr": {"grid_search": [0.003]}},
    )
    proc = run(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (first,) = trial_runs(tmp_path, "edited")
    (parent,) = _sweep_runs(tmp_path, "edited")
    raw = yaml.safe_load(sweep.read_text())
    raw["search_space"]["lr"]["grid_search"].append(0.01)
    raw["description"] = "lr 0.01 too"
    sweep.write_text(yaml.safe_dump(raw))

    proc = run(sweep, "--resume")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: --resume: sweep edited's file changed since it started, in keys that alter its "
        "trials (search_space.lr); start a new sweep (another name:), or pass --resume "
        "--accept-changes to run the trials the edit adds"
    ]
    assert [r.info.run_id for r in trial_runs(tmp_path, "edited")] == [first.info.run_id]

    proc = run(sweep, "--resume", "--accept-changes")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--resume: description changed since the sweep started; accepted" in proc.stderr
    assert "--accept-changes: 1 trial(s) added to sweep edited (search_space.lr)" in proc.stderr
    runs = trial_runs(tmp_path, "edited")
    assert sorted(r.data.params["lr"] for r in runs) == ["0.003", "0.01"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)
    old = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(first.info.run_id)
    assert old.info.end_time == first.info.end_time  # not run again
    assert steps(tmp_path, first.info.run_id) == [0]
    (parent,) = _sweep_runs(tmp_path, "edited")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.note.content"] == "lr 0.01 too"

    proc = run(sweep, "--resume")  # the edited file is now the sweep's: nothing to run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "changed since" not in proc.stderr and "added" not in proc.stderr
    again = trial_runs(tmp_path, "edited")
    assert {r.info.run_id: r.info.end_time for r in again} == {
        r.info.run_id: r.info.end_time for r in runs
    }
