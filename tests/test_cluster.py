"""Sweeps across two machines that share no disk, built inside this one.

The head node listens on 127.0.0.2, the worker on 127.0.0.3 (Ray would replace 127.0.0.1 by the
machine's interface address). The worker runs in its own mount namespace with tmpfs over the
test's `data/` and `runs/`, so it sees neither the head's dataset nor a head-local run storage.
Token authentication is on for nodes and driver. An S3 API (moto's server mode) and an
`mlflow server` listen on 127.0.0.1. Every process is stopped by its process group.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from segtune.config.names import (
    ATTEMPTS_TAG,
    EPOCH_METRICS,
    ERROR_TAG,
    FINAL_METRICS,
    NODE_TAG,
    ROLE_TAG,
)
from segtune.data.synthetic import generate
from tests.helpers import mount_namespace_missing, wait_for
from tests.servers import BIN, free_port, mlflow_server, port_open, process, s3_server, stop
from tests.test_sweep import BENCH, TINY_TRAIN

HEAD, WORKER = "127.0.0.2", "127.0.0.3"
# several nodes: run by `make test-cluster` (CI runs it too), outside `make test`'s budget
pytestmark = pytest.mark.launch

TRAIN = {"arch": "unet", "backbone": "none", **TINY_TRAIN}
SYNTHETIC = {"train": 12, "test": 4, "size": "96x64", "seed": 0}


def namespaces_missing() -> str | None:
    """Why this machine cannot build a second node, or None."""
    if missing := mount_namespace_missing():
        return missing
    if not (BIN / "moto_server").exists():
        return "moto[server] is not installed (pip install -e '.[dev]')"
    return None


@dataclass
class Cluster:
    root: Path  # the test's project folder: data/ and runs/ are hidden from the worker
    address: str
    env: dict[str, str]
    tracking_uri: str
    s3: str
    worker: subprocess.Popen[bytes]

    def ray(self, code: str) -> str:
        """The last line a driver running `code` (with `ray` connected) prints."""
        code = f"import ray, time\nray.init(address={self.address!r}, log_to_driver=False)\n{code}"
        done = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=90
        )
        return done.stdout.strip().splitlines()[-1] if done.returncode == 0 else ""

    def alive_nodes(self) -> int:
        return int(self.ray("print(sum(n['Alive'] for n in ray.nodes()))") or 0)

    def wait_idle(self) -> None:
        """Until every CPU of the cluster is free again (a killed driver's trials are gone)."""
        code = (
            "for _ in range(120):\n"
            "    if ray.available_resources().get('CPU', 0) >= ray.cluster_resources()['CPU']:\n"
            "        break\n"
            "    time.sleep(0.5)\n"
            "print('idle')\n"
        )
        assert self.ray(code) == "idle"

    def sweep(self, name: str, **sections: Any) -> Path:
        sweep = {
            "name": name,
            "data": {"root": "data/synthetic", "synthetic": SYNTHETIC},
            "train": {**TRAIN, "epochs": 2},
            "search_space": {"lr": {"grid_search": [0.003, 0.001]}},
            "tune": {
                "resources_per_trial": {"cpu": 1},
                "storage_path": "s3://segtune/runs",
                "storage_endpoint": self.s3,
                "max_failures": 1,
            },
            "bench": BENCH,
        }
        for key, value in sections.items():
            sweep[key] = {**sweep[key], **value}
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(sweep))
        return path

    def command(self, sweep: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "segtune.run", str(sweep), "--address", self.address,
                "--tracking-uri", self.tracking_uri, "--no-report", *args]  # fmt: skip

    def run(self, sweep: Path, *args: str, timeout: int = 420) -> subprocess.CompletedProcess[str]:
        """The sweep's driver to its end; one that hangs shows where (faulthandler) and fails."""
        proc = subprocess.Popen(
            self.command(sweep, *args),
            cwd=self.root,
            env={**self.env, "PYTHONFAULTHANDLER": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            out, err = proc.communicate()
            raise AssertionError(f"the driver hung for {timeout} s:\n{err[-8000:]}") from None
        finally:
            stop(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    @contextlib.contextmanager
    def driver(self, sweep: Path) -> Iterator[subprocess.Popen[bytes]]:
        """The sweep's driver in the background, output in `<sweep>.log`; killed at the end."""
        with self.log(sweep).open("wb") as log:
            proc = subprocess.Popen(
                self.command(sweep),
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                yield proc
            finally:
                stop(proc)

    def log(self, sweep: Path) -> Path:
        return self.root / f"{sweep.stem}.log"

    def output(self, sweep: Path) -> str:
        return self.log(sweep).read_text()

    def trials(self, experiment: str) -> list[Run]:
        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        return client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")

    def epochs(self, run_id: str, key: str = "train_loss") -> list[int]:
        return [m.step for m in MlflowClient(self.tracking_uri).get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if reason := namespaces_missing():
        pytest.skip(reason)
    # short paths: Ray's socket files live under --temp-dir, and a socket path has 107 bytes
    root = Path(tempfile.mkdtemp(prefix="st-"))
    for hidden in ("data", "runs"):
        (root / hidden).mkdir()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    env.pop("RAY_ADDRESS", None)
    port = free_port(HEAD)
    ray = BIN / "ray"
    head = [ray, "start", "--head", f"--node-ip-address={HEAD}", f"--port={port}",
            f"--temp-dir={root / 'h'}", "--num-cpus=1", "--num-gpus=0",
            "--include-dashboard=false", "--disable-usage-stats", "--block"]  # fmt: skip
    mounts = " && ".join(f"mount -t tmpfs tmpfs {root / d}" for d in ("data", "runs"))
    join = shlex.join([str(ray), "start", f"--address={HEAD}:{port}", f"--node-ip-address={WORKER}",
                       f"--temp-dir={root / 'w'}", "--num-cpus=1", "--num-gpus=0", "--block"])  # fmt: skip
    worker = ["unshare", "--mount", "--fork", "--", "sh", "-c", f"{mounts} && exec {join}"]
    try:
        with (
            s3_server(root, env) as s3,
            mlflow_server(root) as tracking_uri,
            process(head, root / "head.log", lambda: port_open(HEAD, port), env),
            process(worker, root / "worker.log", lambda: True, env) as worker_proc,
        ):
            cluster = Cluster(root, f"{HEAD}:{port}", env, tracking_uri, s3, worker_proc)
            wait_for(lambda: cluster.alive_nodes() >= 2, "the worker to join", timeout=90,
                     process=worker_proc, log=root / "worker.log", every=1)  # fmt: skip
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_ray_address_in_the_environment_is_joined_without_a_traceback(cluster: Cluster) -> None:
    """Without --address, Ray itself joins the cluster RAY_ADDRESS names; the driver's setting
    for a Ray of its own (no idle task workers) must then not be passed, or ray.init raises."""
    probe = (
        "from segtune.sweep.signals import StopSignals\n"
        "from segtune.sweep.ray_init import start_ray\n"
        "import ray\n"
        "with StopSignals() as stop:\n"
        f"    start_ray(None, {cluster.tracking_uri!r}, 60, stop)\n"
        "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))\n"
        "ray.shutdown()\n"
    )
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(sorted([HEAD, WORKER])), done.stdout


def test_a_head_local_setup_is_refused_on_every_count(cluster: Cluster) -> None:
    """Local run storage, a dataset only on the head, a sqlite store: three lines, exit 2."""
    real = cluster.root / "data" / "real"  # hidden from the worker by its tmpfs
    generate(real, n_train=4, n_test=2, size=(96, 64), seed=0, progress=False)
    sweep = cluster.sweep(
        "refused",
        data={"root": str(real), "synthetic": None},
        tune={"storage_path": "runs", "storage_endpoint": None},
    )
    store = cluster.root / "local.db"
    command = cluster.command(sweep)
    command[command.index("--tracking-uri") + 1] = f"sqlite:///{store}"
    done = subprocess.run(
        command, cwd=cluster.root, env=cluster.env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert any("--tracking-uri sqlite" in line for line in lines), done.stderr
    node = f"node {WORKER} "
    assert any(node in line and "tune.storage_path" in line for line in lines), done.stderr
    assert any(node in line and "data.root" in line for line in lines), done.stderr
    assert not any(f"node {HEAD} " in line for line in lines), "the head has all it needs"
    assert "Traceback" not in done.stderr
    assert not store.exists(), "no MLflow store, no run, before the checks pass"


# A fresh process per trial where a test asserts a trial on each node: with reuse, a trial that
# ends while the other node's process still starts hands its process to the other trial, and
# both run on one node (docs/design.md, reuse_actors; 1 run in 3 here, and in CI).
FRESH = {"reuse_actors": False}


def test_s3_sweep_places_a_trial_on_each_node(cluster: Cluster) -> None:
    done = cluster.run(cluster.sweep("spread", tune=FRESH))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = cluster.trials("spread")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    placed = {r.data.tags[NODE_TAG].split()[0] for r in runs}
    why = [(r.data.tags.get(NODE_TAG), r.data.tags.get(ATTEMPTS_TAG)) for r in runs]
    assert placed == {HEAD, WORKER}, f"{why}\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    header = next(line for line in done.stdout.splitlines() if line.split()[:1] == ["label"])
    assert header.split()[:2] == ["label", "node"], "the summary names each trial's node"
    client = MlflowClient(cluster.tracking_uri)
    for r in runs:
        assert set(FINAL_METRICS) - set(r.data.metrics) == {"infer_ms_gpu"}
        for key in EPOCH_METRICS:
            assert cluster.epochs(r.info.run_id, key) == [0, 1], key
        assert r.data.tags[ATTEMPTS_TAG] == "1" and ERROR_TAG not in r.data.tags
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"checkpoints", "eval"} <= artifacts, "artifacts reach the server from both nodes"


def test_killed_driver_resumes_from_s3(cluster: Cluster) -> None:
    """The driver is killed once the second trial has trained an epoch, whatever Tune's
    background upload to S3 holds then (segtune.sweep.restore repairs it); --resume finishes
    the sweep without training the first trial again."""
    epochs = 10
    sweep = cluster.sweep("resume", train={"epochs": epochs}, tune={"max_concurrent_trials": 1})
    with cluster.driver(sweep) as driver:
        wait_for(lambda: any(cluster.epochs(r.info.run_id) for r in _second(cluster)),
                 "a second trial's first epoch", timeout=300, process=driver,
                 log=cluster.log(sweep), every=0.3)  # fmt: skip
    first = next(r for r in cluster.trials("resume") if r.info.status == "FINISHED")
    cluster.wait_idle()  # the killed driver's trials are gone from the cluster
    done = cluster.run(sweep, "--resume")
    errors = [r.data.tags.get(ERROR_TAG) for r in cluster.trials("resume")]
    assert done.returncode == 0, f"{errors}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    runs = cluster.trials("resume")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    again = next(r for r in runs if r.info.run_id == first.info.run_id)
    assert again.info.end_time == first.info.end_time, "a finished trial was trained again"
    for r in runs:
        assert cluster.epochs(r.info.run_id) == list(range(epochs))


def test_a_lost_node_hands_its_trial_to_the_head(cluster: Cluster) -> None:
    """The worker's raylet dies after its trial's second checkpoint; the trial finishes on the
    head from that checkpoint, in the same MLflow run, each epoch logged once."""
    epochs = 6
    sweep = cluster.sweep("lost", train={"epochs": epochs}, tune=FRESH)
    with cluster.driver(sweep) as driver:

        def second_epoch_on_worker() -> Any:
            """The trial run on the worker once it has logged two epochs."""
            on_worker = [
                r for r in _trials(cluster, "lost") if r.data.tags[NODE_TAG].startswith(WORKER)
            ]
            if on_worker and len(cluster.epochs(on_worker[0].info.run_id)) >= 2:
                return on_worker[0]
            return None

        trial = wait_for(second_epoch_on_worker, "a trial's epoch 2 on the worker", timeout=300,
                         process=driver, log=cluster.log(sweep), every=0.3)  # fmt: skip
        os.kill(_raylet_of(cluster.worker.pid), signal.SIGKILL)
        driver.wait(timeout=400)
    assert driver.returncode == 0, cluster.output(sweep)[-4000:]
    runs = cluster.trials("lost")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    moved = next(r for r in runs if r.info.run_id == trial.info.run_id)
    assert moved.data.tags[NODE_TAG].startswith(HEAD) and moved.data.tags[ATTEMPTS_TAG] == "2"
    for r in runs:
        assert cluster.epochs(r.info.run_id) == list(range(epochs)), "each epoch exactly once"
        assert ERROR_TAG not in r.data.tags, "no stale error after a successful retry"


def _second(cluster: Cluster) -> list[Run]:
    """The trial of the `resume` sweep that started after the first one finished."""
    runs = _trials(cluster, "resume")
    return [r for r in runs if r.info.status == "RUNNING"] if len(runs) == 2 else []


def _trials(cluster: Cluster, experiment: str) -> list[Run]:
    client = MlflowClient(cluster.tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        return []
    return cluster.trials(experiment)


def _raylet_of(group: int) -> int:
    """The raylet among the processes of one process group (this test's worker node)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != group:
                continue
            command = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except (OSError, ProcessLookupError):
            continue
        if command.endswith(b"/raylet"):
            return int(entry.name)
    raise AssertionError(f"no raylet in process group {group}")
