"""A sweep in which no trial can start (segtune.sweep.stall): the watch's rule on Ray's own trial
objects; Ray Tune waiting inside a step on a searcher that hands out nothing, stopped at once;
and a driver whose trial's CPU another job holds on the Ray it joins, new and resumed: one line
naming the trial and its state, exit 1, its runs closed; the CPU freed, `--resume` finishes."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.search import Searcher

from segtune.config.names import ROLE_TAG, STOPPED_TAG
from segtune.sweep import stall
from segtune.sweep.signals import StopSignals, SweepInterrupted
from segtune.sweep.stall import STALL_ENV, StallWatch, stall_line, watch_stalls
from tests.servers import BIN, free_port, port_open, process
from tests.test_sweep import steps, trial_runs, write_sweep

HOST = "127.0.0.4"  # the test's Ray head (test_cluster's are .2 and .3)
STALL_S = 4
MARGIN_S = 10  # the watch's pace, and a busy machine's
STOPPING = r"WARNING segtune.sweep.signals: no trial could start"


def _trial(name: str, status: str) -> Trial:
    trial = Trial("train", stub=True, placement_group_factory={"cpu": 1})
    trial.create_placement_group_factory()
    trial.custom_trial_name = name
    trial.set_status(status)
    return trial


def test_the_watch_waits_while_trials_run_or_change_and_names_them_once_none_can_start() -> None:
    watch = StallWatch(0.3)
    a, b = _trial("a", Trial.RUNNING), _trial("b", Trial.PENDING)

    def steps_for(seconds: float, change: Callable[[], None] = lambda: None) -> str | None:
        """Tune's loop for `seconds`; the first stall line the watch would stop with."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            change()
            watch.on_step_begin(0, [a, b])
            watch.on_step_end(0, [a, b])
            if line := watch.stalled(time.monotonic()):
                return line
            time.sleep(0.02)
        return None

    assert watch.stalled(time.monotonic() + 10) is None, "not before Tune's loop begins"
    assert steps_for(0.8) is None, "a long RUNNING trial is no stall"
    a.set_status(Trial.TERMINATED)
    flip = lambda: b.set_status(Trial.PAUSED if b.status == Trial.PENDING else Trial.PENDING)  # noqa: E731
    assert steps_for(0.8, flip) is None, "a change of state starts the window again"
    b.set_status(Trial.TERMINATED)  # nothing waits: the searcher hands out nothing
    started = time.monotonic()
    line = steps_for(5)
    assert 0.3 <= time.monotonic() - started < 5
    assert line == (
        "no trial could start for 0.3 s: a (TERMINATED), b (TERMINATED); the searcher hands out "
        "no further trial though the sweep is not finished (its saved state may count an ended "
        "trial as live)"
    )
    moment = time.monotonic()
    assert not watch.in_step_since(moment), "between steps"
    watch.on_step_begin(0, [a, b])  # Tune waits for a trial inside this step
    assert watch.in_step_since(time.monotonic()) and not watch.in_step_since(moment)


def test_the_line_names_the_waiting_trials_first_and_counts_the_rest() -> None:
    trials = [_trial(f"t{i}", Trial.TERMINATED) for i in range(12)] + [_trial("w", Trial.ERROR)]
    line = stall_line(trials, 60)
    assert line.startswith("no trial could start for 60 s: w (ERROR), t0 (TERMINATED), ")
    assert "t6 (TERMINATED) and 5 more TERMINATED;" in line


class NoTrials(Searcher):
    """A searcher that hands out nothing and never finishes, as Ray's grid does when its saved
    state counts an ended trial as live under `max_concurrent_trials: 1`."""

    def suggest(self, trial_id: str) -> None:
        return None


def test_tune_waiting_on_a_searcher_that_hands_out_nothing_is_stopped_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Ray Tune itself, through the driver's StopSignals: Tune's loop waits inside one step
    for the searcher's trial (up to 600 s) and takes no graceful stop meanwhile; the watch asks
    for it after the window, then stops at once GRACE_S later."""
    monkeypatch.setenv(STALL_ENV, "1")
    monkeypatch.setattr(stall, "GRACE_S", 1.0)
    root = Path(tempfile.mkdtemp(prefix="sn-"))  # short: Ray's socket paths
    ray.init(num_cpus=1, _temp_dir=str(root / "ray"), include_dashboard=False,
             configure_logging=False, log_to_driver=False)  # fmt: skip
    try:
        tuner = tune.Tuner(
            _train,
            tune_config=tune.TuneConfig(search_alg=NoTrials(), num_samples=2),
            run_config=tune.RunConfig(name="none", storage_path=str(root / "runs"), verbose=0),
        )
        started = time.monotonic()
        with (
            StopSignals() as stop,
            stop.graceful(),
            pytest.raises(SweepInterrupted) as raised,
            watch_stalls(tuner, partial(stop.give_up, close_runs=True), stop.stop_now),
        ):
            tuner.fit()
        took = time.monotonic() - started
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    assert raised.value.exit_code == 1 and stop.close_runs and stop.received is None
    assert stop.lost == (
        "no trial could start for 1 s: no trials; the searcher hands out no further trial "
        "though the sweep is not finished (its saved state may count an ended trial as live)"
    )
    assert 2 <= took < 30, took


def _train(config: dict[str, object]) -> None:
    tune.report({"done": 1})


@dataclass(frozen=True)
class Head:
    address: str
    env: dict[str, str]  # token authentication on, as on a cluster (`segtune.cluster`)


@pytest.fixture
def head() -> Iterator[Head]:
    """A Ray head of one CPU on HOST, its own temp dir (short: Ray's socket paths)."""
    root = Path(tempfile.mkdtemp(prefix="ss-"))
    port = free_port(HOST)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    command = [BIN / "ray", "start", "--head", f"--node-ip-address={HOST}", f"--port={port}",
               f"--temp-dir={root}", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
               "--disable-usage-stats", "--block"]  # fmt: skip
    try:
        with process(command, root / "head.log", lambda: port_open(HOST, port), env):
            yield Head(f"{HOST}:{port}", env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


HOLD = """
import ray, sys, time
ray.init(address=sys.argv[1], log_to_driver=False)
hold = ray.remote(num_cpus=1)(type("Hold", (), {"ready": lambda self: True})).remote()
ray.get(hold.ready.remote())
print("held", flush=True)
time.sleep(3600)
"""


@pytest.mark.launch  # three drivers, 90 s: make test-cluster, and CI
def test_a_sweep_whose_trial_cannot_start_ends_in_one_line_and_resumes(
    head: Head, synthetic_root: Path, tmp_path: Path
) -> None:
    """Another job's actor holds the one CPU of the Ray the driver joins (RAY_ADDRESS): the
    trial stays PENDING, and the driver stops after STALL_S with one line and exit 1, its sweep
    run KILLED; so does its --resume (a restored Tuner). The CPU freed, --resume finishes."""
    sweep = write_sweep(tmp_path / "stall.yaml", synthetic_root)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", store,
               "--no-report"]  # fmt: skip
    joined = {**head.env, "RAY_ADDRESS": head.address}
    log = tmp_path / "hold.log"
    hold = [sys.executable, "-c", HOLD, head.address]
    with process(hold, log, lambda: "held" in log.read_text(), head.env, timeout=120):
        for args in ([], ["--resume"]):  # a new Tuner, then a restored one
            done = subprocess.run([*command, *args], cwd=tmp_path, text=True, capture_output=True,
                                  env={**joined, STALL_ENV: str(STALL_S)}, timeout=300)  # fmt: skip
            out = done.stdout + done.stderr
            assert done.returncode == 1, out[-4000:]
            last = done.stderr.strip().splitlines()[-1]
            assert f"no trial could start for {STALL_S} s: unet-none-basic (PENDING); " in last
            assert "each asks CPU 1, the cluster has CPU 0 of 1 free" in last, last
            assert "--resume" in last and "Traceback" not in out, out[-4000:]
            # from the first progress table (Tune's first step) to the stop: the window, and a
            # little more (clocks of one second)
            waited = _clock(done.stderr, STOPPING) - _clock(done.stdout, r"trials: ")
            assert STALL_S - 1 <= waited % 86400 <= STALL_S + MARGIN_S, waited
            runs = _runs(store, "stall")
            assert [r.info.status for r in runs] == ["KILLED"], "the sweep run; no trial ran"
            assert "no trial could start" in runs[0].data.tags[STOPPED_TAG]
    done = subprocess.run([*command, "--resume"], cwd=tmp_path, env=joined,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert [r.info.status for r in _runs(store, "stall")] == ["FINISHED"]
    (trial,) = trial_runs(tmp_path, "stall")
    assert trial.info.status == "FINISHED" and steps(tmp_path, trial.info.run_id) == [0, 1]


def _clock(out: str, after: str) -> int:
    """The second of the day of the first line that starts with a time and then `after`."""
    found = re.search(rf"^(\d\d):(\d\d):(\d\d) {after}", out, re.MULTILINE)
    assert found, f"no line with {after!r}:\n{out[-3000:]}"
    hours, minutes, seconds = (int(g) for g in found.groups())
    return hours * 3600 + minutes * 60 + seconds


def _runs(store: str, experiment: str) -> list[object]:
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'")
