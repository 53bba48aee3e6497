"""The cluster's MLflow server asks for a login (MLflow's basic-auth app): the password `check`
makes once on the launching machine, the server as the head's start runs it (`segtune.cluster
tracking-server`, on 127.0.0.1 here), and a short sweep logged in through MLflow's environment
variables. `ray up` with it on two hosts: tests/test_cluster_launch.py."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from segtune.config.names import ROLE_TAG
from segtune.tracking.address import server_health
from segtune.tracking.auth import PASSWORD_FILE, create_password
from tests.helpers import wait_for
from tests.hosts import CHECKOUT
from tests.servers import answers, free_port, port_open
from tests.test_cluster_launch import _cluster, _head_ray
from tests.test_sweep import write_sweep


def test_check_makes_the_mlflow_password_once_and_keeps_it_private(tmp_path: Path) -> None:
    config, env = _checkable(tmp_path)
    password_file = Path(env["HOME"]) / PASSWORD_FILE[2:]
    first = _cluster("check", str(config), env=env)
    assert first.returncode == 0, first.stderr
    assert f"made the MLflow admin's password: {PASSWORD_FILE} (mode 600)" in first.stdout
    assert f"user admin, password in {PASSWORD_FILE}" in first.stdout  # how to open the UI
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text().strip()
    assert len(password) >= 32
    second = _cluster("check", str(config), env=env)
    assert second.returncode == 0, second.stderr
    assert "made" not in second.stdout and password_file.read_text().strip() == password
    assert password not in first.stdout + first.stderr + second.stdout + second.stderr
    password_file.chmod(0o644)
    done = _cluster("check", str(config), env=env)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        f"other users can read the MLflow admin password (mode 644); chmod 600 {password_file}"
    )
    assert len(done.stderr.strip().splitlines()) == 1
    raw = yaml.safe_load(config.read_text())
    del raw["file_mounts"][PASSWORD_FILE]
    config.write_text(yaml.safe_dump(raw))
    done = _cluster("check", str(config), env=env)
    assert done.returncode == 2
    assert f"file_mounts lacks {PASSWORD_FILE}: {PASSWORD_FILE}" in done.stderr


@pytest.mark.launch  # a login server started and restarted: make test-cluster (make test's 12 min)
def test_the_tracking_server_asks_for_a_login_and_lives_as_long_as_the_heads_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It answers before the command returns, refuses MLflow's API without the admin's login
    (401: to segtune's health check a server that is up), lets the admin add users as README
    says (who read, and write nothing unless granted), and stops once the head's Ray port
    closes. A password file made anew is the admin's at the next start."""
    password_file = tmp_path / PASSWORD_FILE[2:]
    state = tmp_path / "segtune-tracking"
    for attempt in range(2):
        old = password_file.read_text().strip() if attempt else None
        password_file.unlink(missing_ok=True)
        create_password(password_file)
        password = password_file.read_text().strip()
        with _head_ray() as ray_port:
            port, said = _start_tracking_server(tmp_path, ray_port)
            url = f"http://127.0.0.1:{port}"
            assert _api_status(url) == 401
            assert _api_status(url, ("admin", password)) == 200
            assert _api_status(url, ("admin", old or "x" * 16)) == 401
            assert server_health(url) is None and answers(f"{url}/health")
            server = [c for c in _cmdlines() if "mlflow" in c and f"--port {port} " in c]
            assert server and "--app-name basic-auth" in server[0], server
            if not attempt:  # README: the admin adds a user with MLflow's client, or its form
                monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
                monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
                get_app_client("basic-auth", url).create_user("ana", "her own password")
                ana = ("ana", "her own password")
                assert _api_status(url, ana) == 200
                assert _api_status(url, ana, write=True) == 403  # READ in others' experiments
                assert _api_status(url, ("admin", password), path="/signup") == 200
        _wait_stopped(port, state)
        log = (state / "tracking-server.log").read_text()
        assert password not in said + log + (state / "basic_auth.ini").read_text()
    assert (state / "basic_auth.ini").read_text() == (
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{state}/basic_auth.db\n"
        "admin_username = admin\n"
    )
    assert stat.S_IMODE((state / "basic_auth.db").stat().st_mode) == 0o600


@pytest.mark.launch  # a login server started and restarted: make test-cluster (make test's 12 min)
def test_a_sweep_logs_its_trials_with_the_login(
    tmp_path: Path, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short sweep against the server as the cluster starts it, logged in through MLflow's
    environment variables (as `.cluster.env` sets them on every node)."""
    create_password(tmp_path / PASSWORD_FILE[2:])
    login = {
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": (tmp_path / PASSWORD_FILE[2:]).read_text().strip(),
    }
    sweep = write_sweep(tmp_path / "login.yaml", synthetic_root,
                        search_space={"lr": {"grid_search": [0.003]}})  # fmt: skip
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
    try:
        with _head_ray() as ray_port:
            url = f"http://127.0.0.1:{_start_tracking_server(tmp_path, ray_port)[0]}"
            done = subprocess.run(
                [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", url,
                 "--no-report"],
                env={**os.environ, **login, "RAY_TMPDIR": str(ray_tmp)},
                capture_output=True, text=True, timeout=420,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert login["MLFLOW_TRACKING_PASSWORD"] not in done.stdout + done.stderr
            for name, value in login.items():  # MlflowClient reads them at each request
                monkeypatch.setenv(name, value)
            client = MlflowClient(url)
            experiment = client.get_experiment_by_name("login")
            runs = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")
            epochs = [len(client.get_metric_history(r.info.run_id, "val_miou")) for r in runs]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert epochs == [2]  # every epoch logged


def _start_tracking_server(home: Path, ray_port: int) -> tuple[int, str]:
    """`segtune.cluster tracking-server` as the head's start runs it (HOME `home`, which holds
    the password file), on 127.0.0.1; the server's port and all the command said."""
    port = free_port()
    env = {**os.environ, "HOME": str(home), "SEGTUNE_TRACKING_STORE": "sqlite"}
    done = _cluster(
        "tracking-server", "--host", "127.0.0.1", "--port", str(port),
        "--ray-port", str(ray_port), "--workers", "1", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"tracking server: http://127.0.0.1:{port}" in done.stdout
    return port, done.stdout + done.stderr


def _wait_stopped(port: int, state: Path) -> None:
    """Until the server's port is closed and its supervisor gone."""
    supervisor = Path(f"/proc/{(state / 'tracking-server.pid').read_text()}")
    wait_for(
        lambda: not port_open("127.0.0.1", port) and not supervisor.exists(),
        "the server and its supervisor to stop",
        timeout=60,
    )


def _api_status(
    url: str,
    login: tuple[str, str] | None = None,
    write: bool = False,
    path: str = "/api/2.0/mlflow/experiments/search?max_results=1",
) -> int:
    """The HTTP status of a page of the server at `url` (by default a search of MLflow's REST
    API; with `write`, a run created in the admin's Default experiment), with a basic-auth login
    or without."""
    request = urllib.request.Request(f"{url}{path}")
    if write:
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/create",
            data=json.dumps({"experiment_id": "0"}).encode(),
            headers={"Content-Type": "application/json"},
        )
    if login is not None:
        token = base64.b64encode(":".join(login).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _cmdlines() -> list[str]:
    """The command line of every process of this machine."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            found.append(entry.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return found


def _checkable(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The repository's cluster.yaml filled in so that `check` passes, and an environment whose
    HOME (the launching machine's) holds the key and Ray's token."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0" * 64)
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ed25519").write_text("a key\n")
    config = yaml.safe_load((CHECKOUT / "cluster.yaml").read_text())
    config["provider"].update(
        head_ip="10.0.0.10", worker_ips=["10.0.0.11"], segtune_run_storage="/mnt/nfs/runs"
    )
    config["auth"]["ssh_user"] = "ubuntu"
    config["file_mounts"].update(
        {"~/segtune": str(CHECKOUT), "~/segtune/data/tiny-floodnet": str(tmp_path)}
    )
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "cluster.yaml", {**os.environ, "HOME": str(home)}
