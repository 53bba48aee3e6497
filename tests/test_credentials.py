"""A tracking server that asks for a password, given in the tracking URI: the sweep's trials log
with it, and it shows nowhere else: not in the summary, the report, the exported model card, the
run storage, MLflow's records or any log, Ray's included. The URI's user info becomes MLflow's
credential variables at the start (`tracking.address.take_credentials`)."""

from __future__ import annotations

import configparser
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from segtune.config.names import ROLE_TAG
from segtune.config.sweep import load_sweep
from segtune.run import _credentials_apart, _parser, resume_command
from segtune.sweep.edits import sweep_text
from segtune.tracking.address import PASSWORD_ENV, USER_ENV
from segtune.tracking.server import server_command
from tests.servers import answers, free_port, process
from tests.test_sweep import write_sweep


def test_the_resume_command_and_the_sweep_hold_the_uri_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the driver repeats and stores: `--tracking-uri`, a `--set` of it and the sweep
    file's own, each without the user info; the hint says where the credentials come from."""
    for name in (USER_ENV, PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    uri = "http://alice:s3cret@head:5000"
    sweep_file = write_sweep(tmp_path / "s.yaml", tmp_path, mlflow={"tracking_uri": uri})
    args = _parser().parse_args(
        [str(sweep_file), "--tracking-uri", uri, "--set", f"mlflow.tracking_uri={uri}"]
    )
    sweep = _credentials_apart(args, load_sweep(args.sweep, args.set))
    command = resume_command(args)
    assert "s3cret" not in command + sweep_text(sweep), command
    assert "--tracking-uri http://head:5000 " in command
    assert "--set mlflow.tracking_uri=http://head:5000 " in command
    assert command.endswith(f"(with {USER_ENV} and {PASSWORD_ENV} set)")
    assert sweep.mlflow.tracking_uri == "http://head:5000"
    assert (os.environ[USER_ENV], os.environ[PASSWORD_ENV]) == ("alice", "s3cret")


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`mlflow server --app-name basic-auth` on 127.0.0.1 (sqlite stores, artifacts served);
    yields its URL and the admin's password."""
    password = "pw" + secrets.token_hex(12)
    folder = tmp_path / "server"
    folder.mkdir()
    ini = configparser.ConfigParser()
    ini["mlflow"] = {
        "default_permission": "READ",
        "database_uri": f"sqlite:///{folder / 'auth.db'}",
        "admin_username": "admin",
        "admin_password": password,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    with (folder / "auth.ini").open("w") as out:
        ini.write(out)
    port = free_port()
    command = server_command(
        "127.0.0.1", port, f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts", 1
    )
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}  # fmt: skip
    for name in (USER_ENV, PASSWORD_ENV, "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    url = f"http://127.0.0.1:{port}"
    with process([*command, "--app-name", "basic-auth"], folder / "server.log",
                 lambda: answers(f"{url}/health"), env, timeout=180):  # fmt: skip
        yield url, password


def _holding(root: Path, needle: bytes, skip: set[Path]) -> list[str]:
    """Every file under `root` whose bytes hold `needle`."""
    return [str(p) for p in root.rglob("*")
            if p.is_file() and p not in skip and needle in p.read_bytes()]  # fmt: skip


@pytest.mark.launch  # a sweep, its report and an export: make test-cluster (make test's 12 min)
def test_a_password_in_the_tracking_uri_shows_nowhere(
    synthetic_root: Path,
    tmp_path: Path,
    auth_server: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep (its report too) and an export of its best trial, given `http://admin:PASSWORD@...`
    and no credential variables; then the password is searched for in everything they wrote."""
    url, password = auth_server
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
    assert refused.value.code == 401
    uri = url.replace("http://", f"http://admin:{password}@")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in (USER_ENV, PASSWORD_ENV)}
    env["RAY_TMPDIR"] = str(ray_tmp)
    sweep = write_sweep(
        tmp_path / "creds.yaml",
        synthetic_root,
        search_space={"lr": {"grid_search": [0.003, 0.002]}},
        tune={"max_concurrent_trials": 1},
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", uri, "--verbose"],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
        )  # fmt: skip
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-5000:]
        exported = subprocess.run(
            [sys.executable, "-m", "segtune.export", "--experiment", "creds", "--tracking-uri",
             uri, "--format", "torchscript", "--verbose"],  # fmt: skip
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
        )  # fmt: skip
        out += exported.stdout + exported.stderr
        assert exported.returncode == 0, out[-5000:]
        assert "report: " in done.stdout and (tmp_path / "exports" / "creds").is_dir()
        assert password not in out
        # everything written: the report, the card, the run storage, MLflow's stores and
        # artifacts, the server's and Ray's logs; but the auth file, which holds it by design
        skip = {tmp_path / "server" / "auth.ini"}
        needle = password.encode()
        assert _holding(tmp_path, needle, skip) + _holding(ray_tmp, needle, skip) == []
        # the trials' workers got the credentials by the setup hook (a cluster's have no other)
        assert _holding(ray_tmp, b'"worker_process_setup_hook": "set_mlflow_credentials"', skip)
        monkeypatch.setenv(USER_ENV, "admin")
        monkeypatch.setenv(PASSWORD_ENV, password)
        client = MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("creds").experiment_id])
        trials = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
        assert [r.info.status for r in trials] == ["FINISHED"] * 2
        assert all(password not in str(r.data) for r in runs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# A Ray whose processes never had the credentials (as a cluster's nodes): only the hook gives
# them to a worker, and no log of Ray's holds them
HOOKED = r"""
import os, sys
import ray
from segtune.sweep.ray_init import _credentials_hook

name, password = sys.argv[1], sys.stdin.readline().strip()  # not in argv: Ray keeps argv
ray.init(num_cpus=1, include_dashboard=False,
         runtime_env={"worker_process_setup_hook": _credentials_hook({name: password})})
print(ray.get(ray.remote(lambda: os.environ.get(name)).remote()))
ray.shutdown()
"""


def test_the_setup_hook_gives_the_credentials_to_workers_and_no_log(tmp_path: Path) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    password = "pw" + secrets.token_hex(12)
    env = {k: v for k, v in os.environ.items() if k not in (USER_ENV, PASSWORD_ENV)}
    env["RAY_TMPDIR"] = str(ray_tmp)
    try:
        done = subprocess.run(
            [sys.executable, "-c", HOOKED, PASSWORD_ENV],
            input=password + "\n", capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.splitlines()[-1] == password
        assert _holding(ray_tmp, password.encode(), set()) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
