"""A driver that loses its terminal (SIGHUP) or the experiment's artifact location: on a real local
Ray and a real MLflow store (sqlite), every run read back from MLflow, none left RUNNING, and
none of the test's Ray processes left behind.

The SIGHUP tests and the later upload fault start long drivers and are marked `launch` (make
test-cluster), as the SIGTERM tests of tests/test_sweep.py, whose helpers they use.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow.tracking import MlflowClient

from segtune.config.names import ROLE_TAG, STOPPED_TAG
from segtune.sweep.ending import STOP_FILE
from tests.helpers import start_driver, wait_for
from tests.test_sweep import EPOCHS_KEPT_RUNNING, _training, run, write_sweep


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A Ray temporary folder of the test's own (RAY_TMPDIR): short, for Ray's socket paths, and
    the mark by which the test finds its Ray's processes."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def ray_processes(ray_tmp: Path) -> list[psutil.Process]:
    """The processes of the Ray a test's driver started (GCS, raylet, dashboard and runtime-env
    agents, workers, the driver): each inherits its RAY_TMPDIR, which no other Ray shares."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("RAY_TMPDIR") == str(ray_tmp) and proc.status() != "zombie":
                found.append(proc)
    return found


def all_runs(uri: str, experiment: str) -> list[Any]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found is not None else []


def in_terminal(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """The driver in a session of its own whose controlling terminal is a new pseudo-terminal,
    as under `ssh -t` or `ray exec`; the terminal's master end, whose close hangs it up."""
    master, slave = pty.openpty()

    def take_terminal() -> None:  # in the child, after setsid
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    driver = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                              start_new_session=True, preexec_fn=take_terminal)  # fmt: skip
    os.close(slave)
    return driver, master


@contextlib.contextmanager
def drained(master: int) -> Iterator[None]:
    """Read what the driver writes to its terminal, so that it never blocks on a full one, until
    the block ends (a read under way would keep the terminal open past its close)."""
    done = threading.Event()

    def drain() -> None:
        while not done.is_set():
            if select.select([master], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):
                    os.read(master, 65536)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield
    finally:
        done.set()
        reader.join()


@pytest.mark.launch  # about a minute each: make test-cluster
@pytest.mark.parametrize("how", ["driver", "group", "terminal closed"])
def test_sighup_stops_the_sweep_like_sigterm(
    synthetic_root: Path, tmp_path: Path, ray_tmp: Path, how: str
) -> None:
    """SIGHUP to the driver alone, to its whole process group (Ray's GCS and raylet included),
    or from the kernel when the driver's terminal closes (after which writing to it fails):
    the trial stops, its run and the sweep run are KILLED with SIGHUP, exit 129, the --resume
    command is in the line and in the file beside the sweep's state, and nothing of Ray runs."""
    sweep = write_sweep(
        tmp_path / "hup.yaml",
        synthetic_root,
        train={"epochs": EPOCHS_KEPT_RUNNING},
        search_space={"lr": {"grid_search": [0.003, 0.002]}},
        tune={"max_concurrent_trials": 1},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", uri, "--no-report"]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_TMPDIR": str(ray_tmp)}
    log = tmp_path / "driver.log"
    master = None
    if how == "terminal closed":
        driver, master = in_terminal(cmd, tmp_path, env)
    else:
        driver = start_driver(cmd, log, tmp_path, env)
    try:
        with drained(master) if master is not None else contextlib.nullcontext():
            trial = _training(tmp_path, "hup", 0, {})
            assert len(ray_processes(ray_tmp)) >= 5  # the driver, GCS, raylet, agents, trial
        if how == "driver":
            driver.send_signal(signal.SIGHUP)
        elif how == "group":
            os.killpg(driver.pid, signal.SIGHUP)
        else:  # the kernel sends SIGHUP to the terminal's session and foreground group
            os.close(master)
        driver.wait(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    out = log.read_text() if master is None else "(its terminal is gone)"
    assert driver.returncode == 128 + signal.SIGHUP, out[-3000:]
    kept = tmp_path / "ray" / "hup" / STOP_FILE
    line = kept.read_text().strip()  # the one copy of the line once the terminal is gone
    resume = f"continue it with: {sys.executable} -m segtune.run {sweep} --resume"
    assert "stopped by SIGHUP" in line and "2 run(s) closed as KILLED" in line, line
    assert resume in line and "Tune saved no state" not in line, line
    if master is None:
        last = out.strip().splitlines()[-1]
        assert last == "error: " + line.replace(
            "; continue", f"; this line is also in {kept}; continue"
        )
    runs = {r.info.run_id: r for r in all_runs(uri, "hup")}
    assert sorted(r.data.tags[ROLE_TAG] for r in runs.values()) == ["sweep", "trial"]
    for run_ in runs.values():  # the trial that trained, and the sweep run
        assert run_.info.status == "KILLED", (run_.data.tags[ROLE_TAG], run_.info.status)
        assert "SIGHUP" in run_.data.tags[STOPPED_TAG]
    assert trial.info.run_id in runs
    wait_for(  # Ray's processes go with their driver: in seconds, 60 on a busy machine
        lambda: not ray_processes(ray_tmp),
        lambda: f"the end of {[(p.pid, p.name()) for p in ray_processes(ray_tmp)]}",
        timeout=60,
    )


def artifact_sweep(tmp_path: Path, synthetic_root: Path, location: Path) -> tuple[Path, str]:
    """A one-trial sweep whose experiment exists already, its artifacts at `location`."""
    sweep = write_sweep(
        tmp_path / "art.yaml", synthetic_root, train={"epochs": 3}, tune={"max_failures": 0}
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("art", artifact_location=str(location))
    return sweep, uri


def test_a_sweep_run_whose_artifacts_cannot_be_written_is_closed(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """The experiment's artifact location lies under a file: the sweep run's sweep.yaml cannot be
    uploaded. The run is closed KILLED with the cause, and the line counts it."""
    (tmp_path / "afile").write_text("a file, not a folder\n")
    sweep, uri = artifact_sweep(tmp_path, synthetic_root, tmp_path / "afile" / "artifacts")
    proc = run(sweep)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sweep art failed in its driver (NotADirectoryError"), last
    assert "1 run(s) closed as KILLED" in last and "afile" in last, last
    (sweep_run,) = all_runs(uri, "art")
    assert sweep_run.data.tags[ROLE_TAG] == "sweep" and sweep_run.info.status == "KILLED"
    assert "NotADirectoryError" in sweep_run.data.tags[STOPPED_TAG]


@pytest.mark.launch  # a whole sweep with its report, the location changed under it
def test_artifact_uploads_that_fail_later_leave_no_run_running(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """The artifact location becomes a file once the sweep run has its sweep.yaml: the trial's
    checkpoint upload and the report's upload fail. The trial is FAILED with the error, the
    sweep run FAILED, the report a warning; exit 1."""
    location = tmp_path / "artifacts"
    sweep, uri = artifact_sweep(tmp_path, synthetic_root, location)
    cmd = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", uri]
    log = tmp_path / "driver.log"
    driver = start_driver(cmd, log, tmp_path)
    try:
        wait_for(
            lambda: list(location.glob("*/artifacts/sweep.yaml")),
            "the sweep run's sweep.yaml",
            process=driver,
            log=log,
            every=0.05,
        )
        location.rename(tmp_path / "artifacts.before")
        location.write_text("a file where the artifacts were\n")
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    out = log.read_text()
    assert driver.returncode == 1, out[-3000:]
    assert "report not built" in out, out[-3000:]
    runs = {r.data.tags[ROLE_TAG]: r for r in all_runs(uri, "art")}
    assert sorted(runs) == ["sweep", "trial"]
    assert runs["sweep"].info.status == "FAILED"
    assert runs["trial"].info.status == "FAILED"
    assert "NotADirectoryError" in runs["trial"].data.tags["segtune.error"]
