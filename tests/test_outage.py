"""Faults of the driver's own stores. The tracking server gone during a sweep
(segtune.tracking.outage): a short outage is waited out, a long one stops the sweep with its
state saved, and `--resume` finishes it once the server is back (real `mlflow server`s, stopped
and started again on the same port). The disk of the run storage and the store full (a small
tmpfs in a mount namespace of the test's own): one line, and `--resume` repairs and finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow.tracking import MlflowClient

from segtune.config.names import ROLE_TAG
from segtune.tracking import outage
from segtune.tracking.outage import retry_env, retry_span, watch_server
from segtune.tracking.server import tracking_server
from tests.helpers import mount_namespace_missing, start_driver, wait_for
from tests.servers import free_port
from tests.test_sweep import EPOCHS_KEPT_RUNNING, steps, trial_runs, write_sweep

OUTAGE_S = 45  # above the time an mlflow server takes to start again here (about 15 s)


@pytest.mark.parametrize("outage_s", [5, 20, 80, 315, 1000])
def test_retries_last_the_outage_and_wait_least(outage_s: float) -> None:
    env = retry_env(outage_s)
    retries = int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor = int(env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    assert 2 <= retries <= 10 and 1 <= factor <= 120
    assert retry_span(retries, factor) >= outage_s
    # a wait shorter than the last one would not reach the outage with ten retries or fewer
    longest = min(120, factor * 2 ** (retries - 1))
    assert all(retry_span(n, f) < outage_s for n in range(2, 11) for f in range(1, 121)
               if min(120, f * 2 ** (n - 1)) < longest)  # fmt: skip


def test_retry_span_by_hand() -> None:
    assert retry_span(4, 2) == 4 + 8 + 16  # no wait after the first failure
    assert retry_span(10, 1) == 2 + 4 + 8 + 16 + 32 + 64 + 120 + 120 + 120  # 120 s at most


def test_the_watch_asks_until_the_stop_is_taken_and_not_after_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that never answers (nothing listens on the port): after `outage_s` the watch
    calls `on_lost` at every probe until it says it acted, and never once the block ended."""
    monkeypatch.setattr(outage, "PROBE_S", 0.2)  # the rule, not the driver's pace of 2 s
    calls: list[str] = []

    def on_lost(message: str) -> bool:  # as StopSignals.give_up: False until Tune can stop
        calls.append(message)
        return len(calls) >= 2

    with watch_server(f"http://127.0.0.1:{free_port()}", 0.1, on_lost):
        wait_for(lambda: len(calls) >= 2, "the watch's second call of on_lost", timeout=60)
    assert len(calls) == 2 and "did not answer for 0.1 s" in calls[0], calls
    time.sleep(outage.PROBE_S * 5)  # what is tested: no call in the probes after the block
    assert len(calls) == 2


@pytest.mark.launch  # two minutes of drivers and servers: make test-cluster, and CI
def test_a_tracking_server_gone_too_long_stops_the_sweep_for_resume(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """The server stops for 4 s: the trial waits and trains on. It stops again for longer than
    `mlflow.outage_s`: the driver stops the trials, says so in one line with the --resume
    command and exits 1; the runs stay RUNNING (no server to close them). The server back,
    --resume closes them, finishes both trials (every epoch logged once) and the sweep run."""
    sweep = write_sweep(
        tmp_path / "outage.yaml",
        synthetic_root,
        train={"epochs": EPOCHS_KEPT_RUNNING},
        search_space={"lr": {"grid_search": [0.003, 0.002]}},
        tune={"max_concurrent_trials": 1},
        mlflow={"outage_s": OUTAGE_S},
    )
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_server(store, tmp_path, workers=1, settle=False) as server:
        url = server.url
        cmd = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", url,
               "--no-report"]  # fmt: skip
        driver = start_driver(cmd, tmp_path / "driver.log", tmp_path)
        try:
            before = _epochs_of_one_trial(tmp_path, driver, at_least=2)
        except BaseException:
            _kill(driver)
            raise
    port = urlsplit(url).port
    try:
        time.sleep(4)  # what is tested: a short outage, which the trial waits out at its next log
        with tracking_server(store, tmp_path, workers=1, settle=False, port=port):
            during = _epochs_of_one_trial(tmp_path, driver, at_least=before + 2)
        lost = time.monotonic()
        driver.wait(timeout=OUTAGE_S + 180)  # a hang: the driver must stop after OUTAGE_S
        waited = time.monotonic() - lost
    finally:
        _kill(driver)
    out = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert f"did not answer for {OUTAGE_S} s" in last and "--resume" in last, last
    assert "Traceback" not in out
    assert waited >= OUTAGE_S, waited  # not stopped before the outage lasted `outage_s`
    assert during > before
    assert "RUNNING" in {r.info.status for r in trial_runs(tmp_path, "outage")}

    with tracking_server(store, tmp_path, workers=1, settle=False, port=port):
        done = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = trial_runs(tmp_path, "outage")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert steps(tmp_path, r.info.run_id) == list(range(EPOCHS_KEPT_RUNNING))
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("outage").experiment_id
    sweeps = client.search_runs([experiment], f"tags.`{ROLE_TAG}` = 'sweep'")
    assert [r.info.status for r in sweeps] == ["FINISHED"]


def _epochs_of_one_trial(folder: Path, driver: subprocess.Popen[str], at_least: int) -> int:
    """Wait until a trial run has `at_least` epochs logged (read from the store's file)."""

    def logged() -> int:  # the count once it is enough (at_least > 0), else 0
        n = max((len(steps(folder, r.info.run_id)) for r in trial_runs(folder, "outage")),
                default=0)  # fmt: skip
        return n if n >= at_least else 0

    return wait_for(logged, f"{at_least} epochs of a trial logged", process=driver,
                    log=folder / "driver.log")  # fmt: skip


def _kill(driver: subprocess.Popen[str]) -> None:
    if driver.poll() is None:
        os.killpg(driver.pid, 9)
        driver.wait()


@pytest.mark.launch  # a sweep that fills its disk, then its resume: make test-cluster, and CI
@pytest.mark.skipif(bool(mount_namespace_missing()), reason=str(mount_namespace_missing()))
def test_a_full_disk_ends_in_one_line_and_resume_repairs(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Run storage, sqlite store and artifacts on a 24 MB tmpfs, filled while a trial trains:
    the driver ends with one line naming the cause (exit 1, no traceback). Space freed,
    --resume closes what was left RUNNING and finishes: one run per trial, every epoch once."""
    disk = tmp_path / "disk"
    disk.mkdir()
    sweep = write_sweep(
        tmp_path / "full.yaml",
        synthetic_root,
        train={"epochs": EPOCHS_KEPT_RUNNING},
        search_space={"lr": {"grid_search": [0.003, 0.002]}},
        tune={"max_concurrent_trials": 1, "storage_path": str(disk / "ray")},
    )
    store = f"sqlite:///{disk / 'mlflow.db'}"
    # a process holding a mount namespace in which `disk` is a small tmpfs; the rest is shared
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size=24m tmpfs {disk} && echo ready && exec sleep 900"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    inside = ["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", f"--wd={disk}", "--"]
    cmd = [*inside, sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", store,
           "--no-report"]  # fmt: skip

    def statuses() -> dict[str, list[str]]:
        """Trial and sweep runs' statuses, read in the namespace."""
        script = (
            "import json, sys; from mlflow.tracking import MlflowClient;"
            f"c = MlflowClient({store!r}); e = c.get_experiment_by_name('full');"
            "runs = c.search_runs([e.experiment_id]) if e else [];"
            f"print(json.dumps({{r.info.run_id: [r.data.tags.get('{ROLE_TAG}'), r.info.status,"
            " len(c.get_metric_history(r.info.run_id, 'val_miou'))] for r in runs}))"
        )
        done = subprocess.run([*inside, sys.executable, "-c", script], capture_output=True,
                              text=True, timeout=120, check=True)  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        driver = start_driver(cmd, tmp_path / "driver.log")
        try:
            wait_for(
                lambda: any(epochs >= 2 for _, _, epochs in statuses().values()),
                "a trial's second epoch",
                process=driver,
                log=tmp_path / "driver.log",
                every=1,
            )
            filled = subprocess.run([*inside, "sh", "-c", f"cat /dev/zero > {disk}/filler"],
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
            assert "No space left" in filled.stderr, filled.stderr
            driver.wait(timeout=300)
        finally:
            _kill(driver)
        out = (tmp_path / "driver.log").read_text()
        assert driver.returncode == 1, out[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith("error: sweep full failed in its driver") and "--resume" in last, (
            out[-3000:]
        )
        # the tracebacks before it are Ray Tune's log of the failed trial and callback
        assert "database or disk is full" in last or "No space left" in last, last

        subprocess.run([*inside, "rm", f"{disk}/filler"], check=True, timeout=60)
        done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=400)
        runs = list(statuses().values())
        trials = [r for r in runs if r[0] == "trial"]
        # nothing left RUNNING; a trial whose last checkpoint never reached the full disk cannot
        # be restored by Ray and ends FAILED with that reason (exit 1), the others FINISHED
        assert len(trials) == 2 and {s for _, s, _ in trials} <= {"FINISHED", "FAILED"}, runs
        failed = sum(status == "FAILED" for _, status, _ in trials)
        assert done.returncode == (1 if failed else 0), done.stdout[-3000:] + done.stderr[-3000:]
        assert failed or all(epochs == EPOCHS_KEPT_RUNNING for _, _, epochs in trials), runs
        sweep_status = "FAILED" if failed else "FINISHED"
        assert [status for role, status, _ in runs if role == "sweep"] == [sweep_status], runs
    finally:
        holder.kill()
        holder.wait()
