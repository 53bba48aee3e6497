"""`ray up cluster.yaml` on two hosts built inside this machine (`tests/hosts.py`), as a user runs it.

The repository's own cluster.yaml, with its fill-in block filled for the hosts: the launcher
generates the token (`ray get-auth-token --generate`), checks the file (`segtune.cluster
check`), and runs `ray up`, `ray exec` and `ray down`. Run storage is a folder both hosts mount;
the dataset reaches both through the config's file mount. The MLflow server runs on the head,
with the PostgreSQL store (the head's setup starts Debian's package in the head's overlay), and
asks for the admin's login, whose password `check` made on the launcher.
These tests take about two and a half minutes: `make test-cluster` runs them (`.ci/run` too).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from segtune.config.names import NODE_TAG, ROLE_TAG
from segtune.data.synthetic import generate
from segtune.tracking.auth import PASSWORD_FILE, create_password
from tests.hosts import CHECKOUT, Hosts, hosts_missing
from tests.servers import free_port

RAY = str(Path(sys.executable).parent / "ray")
SWEEP = [
    "cd ~/segtune && python -m segtune.run sweeps/quickstart.yaml --address auto --no-report",
    "--set tune.storage_path=$SEGTUNE_RUN_STORAGE --set tune.resources_per_trial.cpu=2",
    "--set data.root=data/synthetic --set data.synthetic=null --set train.epochs=2",
    "--set bench.input=96x64 --set bench.repeats=1",
    "--set tune.reuse_actors=false",  # a trial on each host (tests/test_cluster.py, FRESH)
    "--set 'search_space.model.grid_search=[{arch: unet, backbone: none},"
    " {arch: deeplabv3, backbone: mobilenet_v3_small, aspp: true}]'",
]


@dataclass
class Launched:
    hosts: Hosts
    config: Path
    up: subprocess.CompletedProcess[str]

    def launcher(self, *command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A command on the launching machine, from the checkout (file_mounts' `.`)."""
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_AUTH_MODE", None)
        return subprocess.run(
            self.hosts.launcher(list(command), env), env=env, cwd=CHECKOUT,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def on_head(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.launcher(RAY, "exec", str(self.config), command, timeout=timeout)

    @property
    def password(self) -> str:
        """The MLflow admin's password, as `check` made it on the launcher."""
        return (self.hosts.root / "launcher" / "home" / PASSWORD_FILE[2:]).read_text().strip()

    def tracking(self, code: str) -> object:
        """What `code` (with `client`, an MlflowClient of the head's server, logged in through
        MLflow's environment variables) prints, as JSON."""
        script = (
            "import json, os\nfrom mlflow.tracking import MlflowClient\n"
            "os.environ['MLFLOW_TRACKING_USERNAME'] = 'admin'\n"
            f"os.environ['MLFLOW_TRACKING_PASSWORD'] = open(os.path.expanduser('{PASSWORD_FILE}'))"
            ".read().strip()\n"
            f"client = MlflowClient('http://{self.hosts.hosts['head'].ip}:5000')\n{code}"
        )
        done = self.launcher(sys.executable, "-c", script, timeout=60)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


def fill_in(hosts: Hosts, dataset: Path) -> dict:
    """The repository's cluster.yaml with its fill-in block filled, nothing else changed."""
    config = yaml.safe_load((CHECKOUT / "cluster.yaml").read_text())
    head, worker = hosts.hosts["head"], hosts.hosts["worker"]
    config["provider"].update(
        head_ip=head.ip,
        worker_ips=[worker.ip],
        segtune_run_storage="/mnt/shared/runs",  # both hosts mount it (tests/hosts.py)
        segtune_gpus_per_worker=0,
        segtune_tracking_store="postgresql",  # the head's setup starts Debian's PostgreSQL
    )
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(hosts.key)}
    mounts = config["file_mounts"]
    assert "~/segtune/data/tiny-floodnet" in mounts, "cluster.yaml lost its dataset mount"
    del mounts["~/segtune/data/tiny-floodnet"]
    mounts["~/segtune/data/synthetic"] = str(dataset)
    return config


@pytest.fixture(scope="module")
def launched() -> Iterator[Launched]:
    if reason := hosts_missing():
        pytest.skip(reason)
    hosts = Hosts.create()
    try:
        hosts.add("head", 2)
        hosts.add("worker", 3)
        dataset = hosts.root / "dataset"
        generate(dataset, n_train=16, n_test=4, size=(128, 96), seed=0, progress=False)
        config = hosts.root / "cluster.yaml"
        config.write_text(yaml.safe_dump(fill_in(hosts, dataset), sort_keys=False))
        launched = Launched(hosts, config, subprocess.CompletedProcess([], 0))
        token = launched.launcher(RAY, "get-auth-token", "--generate")
        assert token.returncode == 0, token.stderr
        check = launched.launcher(sys.executable, "-m", "segtune.cluster", "check", str(config))
        assert check.returncode == 0, check.stderr
        assert "ray up -y" in check.stdout
        launched.up = launched.launcher(RAY, "up", "-y", str(config), timeout=300)
        assert launched.up.returncode == 0, launched.up.stdout[-6000:] + launched.up.stderr[-3000:]
        yield launched
    finally:
        hosts.close()
        assert hosts.leftovers() == []


def test_the_template_asks_to_be_filled_in() -> None:
    done = _cluster("check", str(CHECKOUT / "cluster.yaml"))
    assert done.returncode == 2
    assert "fill in provider.head_ip: HEAD_IP" in done.stderr
    assert "auth.ssh_user: SSH_USER" in done.stderr


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"foo": 1}, "Additional properties are not allowed ('foo' was unexpected)"),
        ({"available_node_types": {"gpu": {"node_config": {}, "resources": {"GPU": 1}}}},
         "The field available_node_types is not supported for on-premise clusters"),
    ],
)  # fmt: skip
def test_check_gives_rays_own_refusal_in_one_line(tmp_path: Path, change: dict, said: str) -> None:
    config = yaml.safe_load((CHECKOUT / "cluster.yaml").read_text())
    config["provider"].update(head_ip="10.0.0.10", worker_ips=["10.0.0.11"])
    config["provider"]["segtune_run_storage"] = "/mnt/nfs/runs"
    config["auth"]["ssh_user"] = "ubuntu"
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({**config, **change}))
    done = _cluster("check", str(tmp_path / "cluster.yaml"))
    assert done.returncode == 2
    assert said in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_env_turns_the_fill_in_block_into_exports(tmp_path: Path) -> None:
    config = yaml.safe_load((CHECKOUT / "cluster.yaml").read_text())
    config["provider"].update(head_ip="10.0.0.10", segtune_run_storage="s3://sweeps/seg tune")
    (tmp_path / "bootstrap.yaml").write_text(yaml.safe_dump(config))
    unset = _cluster("env", str(tmp_path / "bootstrap.yaml"))
    assert "SEGTUNE_WEIGHTS_MIRROR" not in unset.stdout  # the template's empty mirror
    config["provider"]["segtune_weights_mirror"] = "http://10.0.0.2:8000/torchvision"
    (tmp_path / "bootstrap.yaml").write_text(yaml.safe_dump(config))
    home = tmp_path / "home"  # the head's, with its copy of the MLflow admin's password
    create_password(home / PASSWORD_FILE[2:])
    password = (home / PASSWORD_FILE[2:]).read_text().strip()
    env = {**os.environ, "HOME": str(home)}
    done = _cluster("env", str(tmp_path / "bootstrap.yaml"), env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "export MLFLOW_TRACKING_URI=http://10.0.0.10:5000" in lines
    assert "export SEGTUNE_RUN_STORAGE='s3://sweeps/seg tune'" in lines  # quoted for the shell
    assert "export RAY_AUTH_MODE=token" in lines
    assert "export SEGTUNE_WEIGHTS_MIRROR=http://10.0.0.2:8000/torchvision" in lines
    # the login: the password is read from each node's own copy of its file, never written here
    assert "export MLFLOW_TRACKING_USERNAME=admin" in lines
    (tmp_path / ".cluster.env").write_text(done.stdout)
    shell = subprocess.run(
        ["bash", "-c", '. "$0" && printf %s "$MLFLOW_TRACKING_PASSWORD"', tmp_path / ".cluster.env"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert shell.stdout == password and password not in done.stdout + done.stderr
    config["provider"]["segtune_tracking_store"] = "mysql"
    (tmp_path / "bootstrap.yaml").write_text(yaml.safe_dump(config))
    done = _cluster("env", str(tmp_path / "bootstrap.yaml"))
    assert done.returncode == 2
    assert "provider.segtune_tracking_store must be one of" in done.stderr
    config["provider"].update(segtune_tracking_store="sqlite", segtune_weights_mirror="10.0.0.2")
    (tmp_path / "bootstrap.yaml").write_text(yaml.safe_dump(config))
    done = _cluster("env", str(tmp_path / "bootstrap.yaml"))
    assert done.returncode == 2
    assert "provider.segtune_weights_mirror must be empty" in done.stderr


@pytest.mark.launch  # a whole sweep or a server: make test-cluster (make test's 12 min)
def test_a_tracking_server_that_does_not_come_up_fails_the_command(tmp_path: Path) -> None:
    create_password(tmp_path / PASSWORD_FILE[2:])
    env = {**os.environ, "HOME": str(tmp_path), "SEGTUNE_TRACKING_STORE": "postgresql"}
    with _head_ray() as ray_port:  # the head's Ray is up: the store is what fails
        done = _cluster(
            "tracking-server", "--host", "127.0.0.1", "--port", str(free_port()),
            "--ray-port", str(ray_port), "--workers", "1", "--timeout", "30", env=env,
        )  # fmt: skip
    assert done.returncode == 2
    assert "the MLflow server did not answer at http://127.0.0.1:" in done.stderr
    assert "postgresql" in done.stderr.lower()  # the server's own log, so the cause shows


@contextlib.contextmanager
def _head_ray() -> Iterator[int]:
    """A listening port that stands in for the head's GCS: the supervisor stops the MLflow
    server once it closes."""
    with socket.socket() as ray:
        ray.bind(("127.0.0.1", 0))
        ray.listen()
        yield ray.getsockname()[1]


def _cluster(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segtune.cluster", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


@pytest.mark.launch
def test_up_brings_two_nodes_with_token_auth(launched: Launched) -> None:
    out = launched.up.stdout
    assert "make: Nothing to be done for 'install'" in out  # the venv's stamp: no reinstall
    assert "tracking store: PostgreSQL database segtune, role root" in out
    assert "tracking server: http://10.213.7.2:5000 (postgresql store" in out
    wait = (
        "python -c \"import ray, time\nray.init(address='auto', logging_level='ERROR')\n"
        "for _ in range(90):\n"
        "    if sum(n['Alive'] for n in ray.nodes()) == 2: break\n"
        "    time.sleep(1)\n"
        "print('nodes', sum(n['Alive'] for n in ray.nodes()))\" && ray status"
    )
    done = launched.on_head(wait, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nodes 2" in done.stdout
    assert "2 local.cluster.node" in done.stdout  # ray status, with the token of ~/.ray/auth_token
    # the dashboard (README: through `ray dashboard`) answers only with the token
    probe = (
        'python -c "import os, urllib.request as u, urllib.error as e\n'
        "token = open(os.path.expanduser('~/.ray/auth_token')).read().strip()\n"
        "for h in ({}, {'Authorization': 'Bearer ' + token}):\n"
        "    try: print('code', u.urlopen(u.Request('http://127.0.0.1:8265/api/jobs/', headers=h)).status)\n"
        "    except e.HTTPError as x: print('code', x.code)\""
    )
    done = launched.on_head(probe, timeout=60)
    assert [line for line in done.stdout.splitlines() if line.startswith("code")] == [
        "code 401",
        "code 200",
    ], done.stdout[-2000:]
    # the MLflow server asks for the admin's login (the browser's prompt: 401 with a Basic
    # challenge) and takes the password `check` made; it reached every node privately and is
    # in no output of `ray up` and no .cluster.env (each node's shell reads its own copy)
    probe = (
        "import base64, os, urllib.request as u, urllib.error as e\n"
        "url = 'http://10.213.7.2:5000/api/2.0/mlflow/experiments/search?max_results=1'\n"
        f"password = open(os.path.expanduser('{PASSWORD_FILE}')).read().strip()\n"
        "login = 'Basic ' + base64.b64encode(('admin:' + password).encode()).decode()\n"
        "for h in ({}, {'Authorization': login}):\n"
        "    try: print('code', u.urlopen(u.Request(url, headers=h)).status)\n"
        "    except e.HTTPError as x: print('code', x.code, x.headers['WWW-Authenticate'])"
    )
    done = launched.launcher(sys.executable, "-c", probe, timeout=60)
    assert [line for line in done.stdout.splitlines() if line.startswith("code")] == [
        'code 401 Basic realm="mlflow"',
        "code 200",
    ], done.stdout[-2000:] + done.stderr[-2000:]
    password = launched.password
    assert password not in out + launched.up.stderr
    for host in launched.hosts.hosts.values():
        copy = host.home / PASSWORD_FILE[2:]
        assert copy.read_text().strip() == password, host.name
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600, host.name
        assert password not in (host.home / "segtune" / ".cluster.env").read_text(), host.name
    # a node without the token, or with another, is refused (from the launcher: it reaches the head)
    for env in ("", f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN={'0' * 64}"):
        stranger = launched.launcher(
            "sh", "-c", f"HOME=/tmp {env} exec {RAY} start --address=10.213.7.2:6379", timeout=120
        )
        said = stranger.stdout + stranger.stderr
        assert stranger.returncode != 0, said[-3000:]
        assert "authentication" in said.lower(), said[-3000:]


@pytest.mark.launch
def test_a_sweep_through_ray_exec_runs_on_both_hosts(launched: Launched) -> None:
    done = launched.on_head(" ".join(SWEEP), timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "sweep quickstart: 2 trials" in done.stdout
    assert launched.password not in done.stdout + done.stderr
    assert "the MLflow UI: http://10.213.7.2:5000" in done.stdout  # from .cluster.env
    trials = launched.tracking(
        "exp = client.get_experiment_by_name('quickstart')\n"
        f"runs = client.search_runs([exp.experiment_id], \"tags.`{ROLE_TAG}` = 'trial'\")\n"
        f"print(json.dumps([[r.info.status, r.data.tags.get('{NODE_TAG}', '')] for r in runs]))"
    )
    # logged with the login of .cluster.env, on both hosts: the server refuses requests without
    assert isinstance(trials, list) and len(trials) == 2
    assert {status for status, _ in trials} == {"FINISHED"}
    assert {node.split()[0] for _, node in trials} == {"10.213.7.2", "10.213.7.3"}


@pytest.mark.launch
def test_down_stops_everything_it_started(launched: Launched) -> None:
    done = launched.launcher(RAY, "down", "-y", str(launched.config), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    hosts = launched.hosts
    left: dict[str, list[str]] = {}
    for _ in range(60):  # the head's MLflow server and the worker follow within seconds
        left = {
            name: [cmd for cmd in hosts.pids(host).values() if not _ours(cmd)]
            for name, host in hosts.hosts.items()
        }
        if not any(left.values()):
            break
        time.sleep(1)
    assert left == {"head": [], "worker": []}


def _ours(cmdline: str) -> bool:
    """What may run after `ray down`: the test's sshd (and SSH sessions), the namespace's init,
    and the head's PostgreSQL, a system service that holds the sweeps' history."""
    return cmdline.startswith(
        ("sshd:", "/usr/sbin/sshd", "unshare ", "/usr/lib/postgresql/", "postgres:")
    )
