"""`--resume` from what the run storage holds (segtune.sweep.restore), at the bad moments
chosen on purpose: a driver killed outright, then the checkpoint its saved state names deleted
or cut short, an older searcher state put beside the newer trials' state, `tuner.pkl` cut
short, or no state of Ray's at all. On local storage and on an S3 server; real Ray and MLflow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pyarrow.fs as pafs
import pytest
from mlflow.tracking import MlflowClient
from ray.tune.utils.serialization import _loads_with_cloudpickle

from segtune.config.names import TRIAL_ID_TAG
from segtune.errors import ConfigError
from segtune.sweep.budget import STATE_FILE as BUDGET_FILE
from segtune.sweep.restore import MARKER_FILE, TUNER_FILE, _Experiment
from segtune.sweep.storage import RunStorage
from tests.helpers import start_driver, wait_for
from tests.servers import s3_server
from tests.test_sweep import _ray_processes, _sweep_runs, run, steps, trial_runs, write_sweep

EPOCHS = 6
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}
SEARCHER_FILES = {
    "grid": ("basic-variant-state-",),
    "optuna": ("search_gen_state-", "searcher-state-"),
}


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    with s3_server(tmp_path, {**os.environ}) as endpoint:
        yield endpoint


class Killed:
    """A sweep of two grid (or Optuna) trials, one at a time, whose driver and Ray are killed
    (SIGKILL to the process group) once the state on storage holds the first trial ended and
    the second with a checkpoint; the searcher's state as it was first saved is kept."""

    def __init__(
        self,
        folder: Path,
        data: Path,
        search: str,
        endpoint: str | None = None,
        tune: dict[str, Any] | None = None,
        space: dict[str, Any] | None = None,
    ):
        """`tune`: settings over these; `space`: another search space."""
        where = f"s3://segtune/{folder.name}" if endpoint else str(folder / "ray")
        tune = {"max_concurrent_trials": 1, "storage_path": where, "search": search,
                **({"num_samples": 2} if search == "optuna" else {}), **(tune or {})}  # fmt: skip
        if space is None:
            space = {"lr": {"loguniform": [0.001, 0.01]} if search == "optuna"
                     else {"grid_search": [0.003, 0.002]}}  # fmt: skip
        if endpoint:
            tune["storage_endpoint"] = endpoint
        self.folder, self.search = folder, search
        self.sweep = write_sweep(folder / "killed.yaml", data, train={"epochs": EPOCHS},
                                 tune=tune, search_space=space)  # fmt: skip
        self.storage = RunStorage.of(where, endpoint)
        self.fs, root = self.storage.filesystem
        self.path = posixpath.join(root, "killed")

    def files(self) -> list[str]:
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector))

    def newest(self, prefix: str) -> str | None:
        return max((f for f in self.files() if f.startswith(prefix)), default=None)

    def read(self, name: str) -> bytes:
        """A file of the experiment's folder (`name`), or anywhere (a path in the storage)."""
        path = name if name.startswith(self.path) else posixpath.join(self.path, name)
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def write(self, name: str, data: bytes) -> None:
        path = name if name.startswith(self.path) else posixpath.join(self.path, name)
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def trials(self) -> dict[str, tuple[str, str | None]]:
        """Each trial of the newest saved state: its status and the checkpoint it names."""
        name = self.newest("experiment_state-")
        if name is None:
            return {}
        try:
            state = json.loads(self.read(name))
        except ValueError:  # Ray copies it in place: read while written
            return {}
        found = {}
        for trial, meta in state["trial_data"]:
            trial = json.loads(trial)
            latest = _loads_with_cloudpickle(meta)["checkpoint_manager"].latest_checkpoint_result
            path = latest.checkpoint.path if latest else None
            found[trial["trial_id"]] = (trial["status"], path)
        return found

    def kill(
        self, env: dict[str, str], until: Callable[[], str | None] | None = None
    ) -> tuple[dict[str, bytes], str]:
        """Start the driver and kill it at the moment described (or once `until` gives a running
        trial's checkpoint); the searcher's files as first saved, and the path of the checkpoint
        the saved state names for the running trial."""
        log = self.folder / "killed.log"
        uri = f"sqlite:///{self.folder / 'mlflow.db'}"
        cmd = [sys.executable, "-m", "segtune.run", str(self.sweep), "--tracking-uri", uri,
               "--no-report"]  # fmt: skip
        env = {**os.environ, **env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
        driver = start_driver(cmd, log, self.folder, env)
        self.pgid = driver.pid  # its process group: `_group_gone` tells when it has ended
        try:
            prefixes = SEARCHER_FILES[self.search]
            names = wait_for(
                lambda: all(map(self.newest, prefixes)) and [self.newest(p) for p in prefixes],
                "the searcher's first saved state", process=driver, log=log, every=0.1
            )  # fmt: skip
            first = {prefix: self.read(name) for prefix, name in zip(prefixes, names, strict=True)}

            def second_named() -> str | None:
                trials = self.trials()
                ended = [t for t in trials.values() if t[0] == "TERMINATED"]
                running = [p for s, p in trials.values() if s != "TERMINATED" and p]
                return running[0] if len(trials) == 2 and ended and running else None

            named = wait_for(until or second_named, "a saved state with one trial ended and the "
                             "other checkpointed" if until is None else "the moment to kill",
                             process=driver, log=log, every=0.2)  # fmt: skip
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        return first, named

    def put_back(self, first: dict[str, bytes]) -> None:
        """The searcher's first saved state in place of its newest: an older searcher state
        beside a newer trials' state."""
        for prefix, data in first.items():
            self.write(self.newest(prefix), data)

    def finished(self, proc: Any) -> None:
        """Exit 0, every trial run FINISHED, each epoch logged once, one sweep run."""
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs = trial_runs(self.folder, "killed")
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs), runs
        for r in runs:
            assert steps(self.folder, r.info.run_id) == list(range(EPOCHS))
        (parent,) = _sweep_runs(self.folder, "killed")
        assert parent.info.status == "FINISHED"


def _trial_of(path: str) -> str:
    return re.search(r"_([0-9a-f]{5}_\d{5})/checkpoint_", path).group(1)


@pytest.mark.launch  # a whole sweep or a server: make test-cluster (make test's 12 min)
def test_a_deleted_checkpoint_an_older_grid_state_and_a_cut_tuner_pkl_resume(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Local storage: the checkpoint the saved state names is deleted, the grid's state is
    its first one (it counts the finished trial as live: Ray's resume would wait for ever) and
    tuner.pkl is cut short; --resume repairs all three, one line each, and finishes."""
    killed = Killed(tmp_path, synthetic_root, "grid")
    first, named = killed.kill({})
    if killed.fs.get_file_info(named).type != pafs.FileType.NotFound:  # else pruned already
        killed.fs.delete_dir(named)
    killed.put_back(first)
    killed.write(TUNER_FILE, killed.read(TUNER_FILE)[:100])
    proc = run(killed.sweep, "--resume")
    gone = re.search(rf"trial {_trial_of(named)}: {posixpath.basename(named)} is gone; "
                     r"resuming from (checkpoint_\d{6}|the start)", proc.stderr)  # fmt: skip
    assert gone, proc.stderr[-3000:]
    assert "tuner.pkl is damaged" in proc.stderr and "put back from segtune's copy" in proc.stderr
    assert "the saved searcher state disagrees with the trials' state" in proc.stderr
    killed.finished(proc)


@pytest.mark.launch  # a whole sweep killed and resumed: make test-cluster (make test's 12 min)
def test_checkpoints_without_markers_of_an_older_segtune_are_left_to_ray(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """A sweep interrupted by a segtune that wrote no marker: its checkpoints have none. The one
    Ray's state names is whole (a worker copies it before the state can name it), so --resume
    neither deletes them nor restarts the trial: Ray resumes it as before, and it finishes."""
    killed = Killed(tmp_path, synthetic_root, "grid")
    _, named = killed.kill({})
    folder = posixpath.dirname(named)
    selector = pafs.FileSelector(folder, recursive=True)
    for info in killed.fs.get_file_info(selector):
        if info.base_name == MARKER_FILE:
            killed.fs.delete_file(info.path)
    if killed.fs.get_file_info(named).type == pafs.FileType.NotFound:
        pytest.skip("Tune's saved state lagged its pruning: no named checkpoint to leave to Ray")
    proc = run(killed.sweep, "--resume")
    assert f"trial {_trial_of(named)}:" not in proc.stderr, proc.stderr[-3000:]
    killed.finished(proc)


@pytest.mark.launch  # a whole sweep killed and resumed: make test-cluster (make test's 12 min)
def test_an_incomplete_checkpoint_and_an_older_grid_state_on_s3_resume(
    synthetic_root: Path, tmp_path: Path, s3: str
) -> None:
    """On S3: the running trial's newest checkpoint with a marker loses bytes (it no longer
    matches its marker: a copy cut short), and the grid's state is its first one; --resume
    skips and deletes that checkpoint, and finishes. (The one the saved state names may be
    gone already: Tune's upload lags its pruning.)"""
    killed = Killed(tmp_path, synthetic_root, "grid", s3)
    first, named = killed.kill(S3_ENV)
    folder = posixpath.dirname(named)
    selector = pafs.FileSelector(folder, recursive=True)
    marked = max(posixpath.dirname(i.path) for i in killed.fs.get_file_info(selector)
                 if i.base_name == MARKER_FILE)  # fmt: skip
    (name,) = json.loads(killed.read(posixpath.join(marked, MARKER_FILE)))["files"]
    killed.write(posixpath.join(marked, name), b"cut short")
    killed.put_back(first)
    proc = run(killed.sweep, "--resume", env=S3_ENV)
    cut = posixpath.basename(marked)
    assert re.search(rf"trial {_trial_of(named)}: {cut} is incomplete", proc.stderr), proc.stderr
    assert killed.fs.get_file_info(marked).type == pafs.FileType.NotFound  # deleted
    killed.finished(proc)


@pytest.mark.launch  # a whole sweep or a server: make test-cluster (make test's 12 min)
def test_an_older_optuna_state_is_one_line_at_once(synthetic_root: Path, tmp_path: Path) -> None:
    """An Optuna study cannot be rebuilt from the trials: a searcher state older than the
    trials' state is refused in one line that says what disagrees, within a minute."""
    killed = Killed(tmp_path, synthetic_root, "optuna")
    first, _ = killed.kill({})
    killed.put_back(first)
    started = time.monotonic()
    proc = run(killed.sweep, "--resume")
    assert time.monotonic() - started < 60
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"sweep killed: Tune saved the Optuna searcher's state and the trials' "
                     r"state at different moments \(searcher: \d trial\(s\), \d ended, \d "
                     r"running; trials' state: 2, 1 ended\)", last), last  # fmt: skip


@pytest.mark.launch  # a whole sweep killed and resumed: make test-cluster (make test's 12 min)
def test_a_driver_killed_before_ray_saved_a_state_resumes_under_its_sweep_run(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Killed once its sweep run exists but before Ray saved any state of the trials: --resume
    starts the trials under the same sweep run instead of refusing."""
    killed = Killed(tmp_path, synthetic_root, "grid")
    log, uri = tmp_path / "killed.log", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "segtune.run", str(killed.sweep), "--tracking-uri", uri,
           "--no-report"]  # fmt: skip
    driver = start_driver(cmd, log, tmp_path, {**os.environ})
    try:
        wait_for(lambda: "segtune_sweep.json" in killed.files(), "the sweep's state file",
                 process=driver, log=log, every=0.05)  # fmt: skip
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    for name in killed.files():  # whatever Ray saved in the moment the kill took
        if name.startswith(("experiment_state-", "basic-variant-state-")):
            killed.fs.delete_file(posixpath.join(killed.path, name))
    assert not trial_runs(tmp_path, "killed")  # no trial had started
    (parent,) = _sweep_runs(tmp_path, "killed")
    proc = run(killed.sweep, "--resume")
    killed.finished(proc)
    assert _sweep_runs(tmp_path, "killed")[0].info.run_id == parent.info.run_id
    client = MlflowClient(uri)
    ids = {r.data.tags[TRIAL_ID_TAG] for r in trial_runs(tmp_path, "killed")}
    assert len(ids) == 2 and client.get_run(parent.info.run_id).info.status == "FINISHED"


def _group_gone(pgid: int) -> bool:
    """Whether every process of the killed driver's group, and its Ray, has ended: a trial
    process that outlived its driver could still write a checkpoint or log an epoch."""
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return False
    return not _ray_processes(pgid)


def _killed_until_finished(
    folder: Path, data: Path, name: str, kills: int, rng: random.Random
) -> list[float]:
    """Run the sweep `name` to its end, its drivers killed (SIGKILL to the process group) at
    random moments, at most `kills` of them, each followed by `--resume` (or a plain start
    where the killed driver had not made its sweep run yet); the kill moments. Then every
    trial FINISHED in Ray's state and in MLflow, each epoch logged once, in one sweep run."""
    epochs = 12
    sweep = write_sweep(folder / f"{name}.yaml", data, train={"epochs": epochs},
                        search_space={"lr": {"grid_search": [0.003, 0.002, 0.001]}},
                        tune={"max_concurrent_trials": 1})  # fmt: skip
    uri, log = f"sqlite:///{folder / 'mlflow.db'}", folder / f"{name}.log"
    cmd = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", uri, "--no-report"]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    experiment, moments = folder / "ray" / name, []
    while True:
        resume = ["--resume"] if (experiment / "segtune_sweep.json").exists() else []
        driver = start_driver([*cmd, *resume], log, folder, env)
        moment = rng.uniform(0, 30) if len(moments) < kills else None
        try:
            driver.wait(timeout=moment if moment is not None else 600)
            break
        except subprocess.TimeoutExpired:
            moments.append(round(moment or 0, 1))
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        gone = functools.partial(_group_gone, driver.pid)
        wait_for(gone, "the killed driver's processes to end", timeout=120)
    assert driver.returncode == 0, f"kills at {moments}:\n{log.read_text()[-4000:]}"
    state = json.loads((experiment / "segtune_sweep.json").read_text())
    newest = max(experiment.glob("experiment_state-*.json")).read_text()
    ids = {json.loads(t)["trial_id"]: json.loads(t)["status"]
           for t, _ in json.loads(newest)["trial_data"]}  # fmt: skip
    assert len(ids) == 3 and set(ids.values()) == {"TERMINATED"}, (moments, ids)
    runs = [r for r in trial_runs(folder, name)
            if r.data.tags.get("mlflow.parentRunId") == state["parent_run_id"]]  # fmt: skip
    assert {r.data.tags[TRIAL_ID_TAG] for r in runs} == set(ids), moments
    for r in runs:
        assert r.info.status == "FINISHED", (moments, r.info.run_id)
        assert steps(folder, r.info.run_id) == list(range(epochs)), moments
    assert MlflowClient(uri).get_run(state["parent_run_id"]).info.status == "FINISHED"
    return moments


@pytest.mark.launch  # minutes of drivers started and killed: make test-cluster
def test_drivers_killed_at_random_moments_then_resumed_finish_their_sweeps(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """SEGTUNE_RANDOM_KILLS (20) kills at random moments, over as many short sweeps as it
    takes; every sweep finishes whole (`_killed_until_finished`)."""
    kills = int(os.environ.get("SEGTUNE_RANDOM_KILLS", "20"))
    seed = int(os.environ.get("SEGTUNE_RANDOM_SEED", str(time.time_ns() % 10**6)))
    rng, started, done = random.Random(seed), time.monotonic(), []
    while (left := kills - sum(map(len, done))) > 0:
        name = f"chaos{len(done)}"
        try:
            done.append(_killed_until_finished(tmp_path, synthetic_root, name, left, rng))
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}, sweep {name}: {exc}") from None
    took = time.monotonic() - started
    print(f"kills at {done} s (seed {seed}); {len(done)} sweep(s) finished in {took:.0f} s")


def test_a_damaged_budget_state_is_one_line_and_stays_where_it_is(tmp_path: Path) -> None:
    """The budget's state is one file with no older copy: set aside like Tune's own damaged
    files, the budget of the resumed sweep would start from nothing and train again."""
    storage = RunStorage.of(str(tmp_path / "runs"))
    folder = tmp_path / "runs" / "budgeted"
    folder.mkdir(parents=True)
    cut = '{"trials": {"a": [12.5, 2'  # a driver killed while Ray copied it
    (folder / BUDGET_FILE).write_text(cut)
    experiment = _Experiment(storage, storage.path("budgeted"), "budgeted")
    with pytest.raises(ConfigError, match=f"the budget's saved state {BUDGET_FILE} is damaged"):
        experiment.budget_state()
    assert (folder / BUDGET_FILE).read_text() == cut
    (folder / BUDGET_FILE).write_text('{"trials": {}, "live": [], "reached": "", "refused": "x"}')
    assert experiment.budget_state() == {"trials": {}, "live": [], "reached": "", "refused": "x"}
