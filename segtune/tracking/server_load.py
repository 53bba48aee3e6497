"""A load test of an MLflow tracking server: many trials logging epochs at once, all read back.

A big sweep's trials all write to one `mlflow server` (`segtune.tracking.server` starts one to
measure): this opens one sweep run and `loggers` trial runs exactly as `segtune.sweep.trainable` opens
them, logs `epochs` epochs of the contract's per-epoch metrics from every trial at once with
`TrialRun.log_epoch`, times each call, then reads every value back and counts what is missing.
Each logger logs its epochs back to back: the burst of trials that end their epochs together
(same configuration, same data), the worst case a server must survive.

The loggers are threads of one process, not processes: each call is one HTTP request whose
time is spent in the server, and 64 processes each importing MLflow would cost a small machine
more CPU than the load they measure. The client's own CPU time per call is recorded
(`LoadResult.client_cpu_s`) so that the share the GIL could distort is visible.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from mlflow.tracking import MlflowClient

from segtune.config.names import EPOCH_METRICS
from segtune.tracking.runs import TrialRun, find_trial_run, start_sweep_run

log = logging.getLogger(__name__)

EXPERIMENT = "segtune-load"
MAX_EXAMPLES = 5  # problems of each kind quoted in a report; the counts cover all of them


@dataclass
class LoadResult:
    """What the loggers sent (`expected`: run id -> key -> [(step, value)]) and how long it took."""

    tracking_uri: str
    parent_run_id: str
    loggers: int
    epochs: int
    expected: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)  # one per log_epoch call
    client_cpu_s: list[float] = field(default_factory=list)  # the logger thread's CPU a call
    errors: list[str] = field(default_factory=list)
    failed: set[tuple[str, int]] = field(default_factory=set)  # (run id, epoch) of failed calls
    open_s: float = 0.0
    wall_s: float = 0.0  # from the start signal to the last logger's finish()

    @property
    def values(self) -> int:
        return sum(len(points) for keys in self.expected.values() for points in keys.values())


def epoch_metrics(rng: random.Random) -> dict[str, float]:
    """Finite random values for every per-epoch key of the contract, in realistic ranges."""
    metrics = {key: rng.random() for key in EPOCH_METRICS}
    metrics["train_loss"], metrics["val_loss"] = rng.uniform(0, 3), rng.uniform(0, 3)
    metrics["lr"] = 10 ** rng.uniform(-6, -2)
    metrics["epoch_time_s"] = rng.uniform(1, 600)
    return metrics


def open_trial(uri: str, experiment: str, parent_run_id: str, index: int, epochs: int) -> TrialRun:
    """A trial's run, opened as `segtune.sweep.trainable` opens it: its own client, a search for an
    earlier attempt, then `TrialRun.open`."""
    client = MlflowClient(uri)
    trial_id = f"load_{index:05d}"
    earlier = find_trial_run(client, experiment, parent_run_id, trial_id)
    return TrialRun.open(
        client,
        experiment=experiment,
        parent_run_id=parent_run_id,
        label=f"load-{index:03d}-seed{index}",
        config_label=f"load-{index:03d}",
        trial_id=trial_id,
        params={"logger": index, "arch": "load", "lr": 1e-3, "epochs": epochs},
        run_id=earlier.info.run_id if earlier else None,
    )


def run_load(
    uri: str,
    loggers: int,
    epochs: int,
    experiment: str = EXPERIMENT,
    seed: int = 0,
    progress: Callable[[str], None] = log.info,
) -> LoadResult:
    """Open one sweep run and `loggers` trial runs, then log `epochs` epochs from all at once.

    A failed call is recorded and the logger goes on (its values will be missing), as the test
    is about what the server keeps. The HTTP connection pool is sized to the loggers (unless
    MLFLOW_HTTP_POOL_MAXSIZE is set) so that each keeps its connection, as a trial process does.
    """
    os.environ.setdefault("MLFLOW_HTTP_POOL_MAXSIZE", str(max(10, loggers)))
    client = MlflowClient(uri)
    description = f"load test: {loggers} loggers x {epochs} epochs of {len(EPOCH_METRICS)} keys"
    parent = start_sweep_run(
        client, experiment, "load", f"loggers: {loggers}\nepochs: {epochs}\n", description
    )
    result = LoadResult(uri, parent, loggers, epochs)
    started = time.perf_counter()
    with ThreadPoolExecutor(min(loggers, 32)) as pool:
        trials = list(
            pool.map(lambda i: open_trial(uri, experiment, parent, i, epochs), range(loggers))
        )
    result.open_s = time.perf_counter() - started
    progress(f"opened {loggers} trial runs in {result.open_s:.1f} s; logging {epochs} epochs each")

    lock, go, stop = threading.Lock(), threading.Event(), threading.Event()
    total, done = loggers * epochs, [0]
    for trial in trials:
        result.expected[trial.run_id] = {key: [] for key in EPOCH_METRICS}

    def logger(index: int, trial: TrialRun) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        sent = result.expected[trial.run_id]
        go.wait()
        for epoch in range(epochs):
            if stop.is_set():
                return
            metrics = epoch_metrics(rng)
            for key, value in metrics.items():
                sent[key].append((epoch, value))
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                trial.log_epoch(epoch, metrics)
            except Exception as exc:  # the server's answer is the measurement: record, go on
                with lock:
                    result.failed.add((trial.run_id, epoch))
                    result.errors.append(f"{trial.run_id} epoch {epoch}: {exc}"[:500])
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            with lock:
                result.latencies_s.append(wall)
                result.client_cpu_s.append(cpu)
                done[0] += 1
                if done[0] * 10 // total > (done[0] - 1) * 10 // total:
                    elapsed = time.perf_counter() - started
                    progress(f"{done[0]}/{total} epochs logged ({elapsed:.1f} s)")
        try:
            trial.finish()
        except Exception as exc:
            with lock:
                result.errors.append(f"{trial.run_id} finish: {exc}"[:500])

    threads = [
        threading.Thread(target=logger, args=(i, t), name=f"logger-{i}", daemon=True)
        for i, t in enumerate(trials)
    ]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    go.set()
    try:
        for thread in threads:
            while thread.is_alive():  # a bounded join, so that Ctrl-C is seen
                thread.join(0.5)
    finally:
        stop.set()
    result.wall_s = time.perf_counter() - started
    client.set_terminated(parent, status="FINISHED")
    return result


@dataclass
class Verification:
    """What the server gave back against what was sent: counts, and the first problems."""

    expected: int = 0
    matched: int = 0  # values read back with the step and the exact value sent
    missing: int = 0
    mismatched: int = 0
    after_error: int = 0  # of the missing and mismatched: sent in a call that raised an error
    extra: int = 0  # values read back that were never sent (or sent once, stored twice)
    runs_not_finished: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind -> the first few

    @property
    def ok(self) -> bool:
        return self.matched == self.expected and not (self.extra or self.runs_not_finished)

    def note(self, kind: str, text: str) -> None:
        quoted = self.examples.setdefault(kind, [])
        if len(quoted) < MAX_EXAMPLES:
            quoted.append(text)

    def summary(self) -> str:
        """One line: how much was lost, and how much of it without an error to the logger."""
        lost = self.expected - self.matched
        return (
            f"{lost} of {self.expected} values lost ({self.missing} missing, {self.mismatched} "
            f"with another value; {self.after_error} in calls that failed with an error, "
            f"{lost - self.after_error} acknowledged by the server), {self.extra} unexpected, "
            f"{self.runs_not_finished} trial runs not FINISHED"
        )


def verify(
    client: MlflowClient,
    expected: dict[str, dict[str, list[tuple[int, float]]]],
    failed: Collection[tuple[str, int]] = (),
    readers: int = 8,
) -> Verification:
    """Read every (run, key) history back and compare it with `expected`: exact steps, values.

    `failed` holds the (run id, epoch) of the calls that raised: a value lost there was lost
    in the open (the trial saw an error), any other was acknowledged and then lost.
    """
    failed = set(failed)
    check = Verification()
    pairs: Sequence[tuple[str, str]] = [(r, k) for r, keys in expected.items() for k in keys]
    with ThreadPoolExecutor(readers) as pool:
        histories = pool.map(lambda p: client.get_metric_history(*p), pairs)
        statuses = dict(
            zip(expected, pool.map(lambda r: client.get_run(r).info.status, expected), strict=True)
        )
        for (run_id, key), history in zip(pairs, histories, strict=True):
            read: dict[int, list[float]] = {}
            for metric in history:
                read.setdefault(metric.step, []).append(metric.value)
            for step, value in expected[run_id][key]:
                check.expected += 1
                got = read.pop(step, [])
                if value in got:
                    check.matched += 1
                    got.remove(value)
                else:
                    check.after_error += (run_id, step) in failed
                    where = f"run {run_id} {key} step {step}"
                    if got:
                        check.mismatched += 1
                        check.note("mismatched", f"{where}: sent {value!r}, read {got.pop(0)!r}")
                    else:
                        check.missing += 1
                        check.note("missing", f"{where}: missing (sent {value!r})")
                if got:
                    check.extra += len(got)
                    check.note(
                        "extra", f"run {run_id} {key} step {step}: {got} read more than once"
                    )
            for step, values in read.items():
                check.extra += len(values)
                check.note("extra", f"run {run_id} {key} step {step}: {values} never sent")
    for run_id, status in statuses.items():
        if status != "FINISHED":
            check.runs_not_finished += 1
            check.note("status", f"run {run_id}: status {status}, not FINISHED")
    return check


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100, linear between ranks); NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else float("nan")
