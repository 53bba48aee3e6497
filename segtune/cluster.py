"""`python -m segtune.cluster`: the steps of `cluster.yaml` that Ray's own CLI does not take.

- `check CLUSTER_YAML` (on the launching machine, before `ray up`): Ray's own validator, every
  placeholder filled, the key, token and mounted folders present; makes the MLflow admin's
  password once (`tracking/auth.py`), mounted like the token; prints the commands to run.
- `env BOOTSTRAP_YAML` (head setup): the settings of the config that `ray up` leaves on the head,
  as the shell exports every node's commands read (`.cluster.env`, synced to the workers with the
  checkout): token mode, the venv on PATH, the head's address, the tracking URI and its
  credentials (the password read from the node's copy of its file), the weights mirror if any.
- `tracking-store` (head setup): the MLflow server's store, a sqlite folder or PostgreSQL
  (Debian's package, a role and database for the SSH user, peer authentication: no password).
- `tracking-server` (head start): the MLflow server on the head's private address, asking for
  credentials (MLflow's basic-auth app; the admin's password from its file). It returns
  only once the server answers, so one that does not come up fails `ray up`, and a supervisor
  stops the server once the head's Ray is gone.
- `follow-head` (worker start): stops the worker's Ray once the head's is gone. `ray down` runs
  `ray stop` on the head only (the local provider's terminate_node just marks a node terminated
  in its state file), and a worker's raylet outlives its GCS: without this, workers keep running.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from segtune.cli import command_parser, run_cli, setup_logging
from segtune.config.trial import WEIGHTS_MIRROR_ENV
from segtune.errors import ConfigError
from segtune.tracking.address import server_health
from segtune.tracking.auth import (
    ADMIN_USER,
    AUTH_APP,
    PASSWORD_FILE,
    create_password,
    password_export,
    read_password,
    server_env,
)
from segtune.tracking.server import SERVER_POOL, server_command, stop_process_group

log = logging.getLogger(__name__)

PLACEHOLDER = re.compile(r"\b(HEAD_IP|WORKER_IP_\d+|SSH_USER|BUCKET)\b")
STORES = ("sqlite", "postgresql")
TRACKING_PORT = 5000
RAY_PORT = 6379
STATE_DIR = Path("~/segtune-tracking")  # the store (sqlite), artifacts, the server's log and pid
POSTGRES_URI = "postgresql+psycopg2:///segtune?host=/var/run/postgresql"


def _settings(config: dict[str, Any], where: str) -> dict[str, Any]:
    """segtune's settings from `provider`, checked: one line per problem, naming the key."""
    provider = config.get("provider") or {}
    store = provider.get("segtune_tracking_store", "sqlite")
    if store not in STORES:
        raise ConfigError(f"{where}: provider.segtune_tracking_store must be one of {STORES}")
    gpus = provider.get("segtune_gpus_per_worker", 0)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise ConfigError(f"{where}: provider.segtune_gpus_per_worker must be a whole number >= 0")
    storage = str(provider.get("segtune_run_storage", ""))
    if not (storage.startswith("s3://") or storage.startswith("/")):
        raise ConfigError(
            f"{where}: provider.segtune_run_storage must be s3://bucket/prefix or an absolute "
            "path that every node mounts (a node-local folder breaks trials on other nodes)"
        )
    mirror = str(provider.get("segtune_weights_mirror") or "")
    if mirror and not mirror.startswith(("http://", "https://")):
        raise ConfigError(
            f"{where}: provider.segtune_weights_mirror must be empty (download.pytorch.org) or "
            "the http(s):// URL of a folder serving torchvision's weights files"
        )
    return {
        "head_ip": provider.get("head_ip"),
        "store": store,
        "gpus": gpus,
        "storage": storage,
        "mirror": mirror,
    }


def _load(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.expanduser().read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the cluster config: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a cluster config is a mapping (cluster_name, provider, ...)")
    return config


def _placeholders(value: Any, key: str = "") -> Iterator[str]:
    """`key: VALUE` for every placeholder still in the fill-in block."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _placeholders(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _placeholders(v, f"{key}[{i}]")
    elif isinstance(value, str) and (found := PLACEHOLDER.search(value)):
        yield f"{key}: {found.group(0)}"


def _ray_validate(config: dict[str, Any], where: str) -> None:
    """Ray's own schema check, on the config as `ray up` prepares it."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # Ray's logger says it once more
            validate_config(prepare_config(config))
    except Exception as exc:  # jsonschema's ValidationError, click's abort, ...: Ray's own words
        message = str(getattr(exc, "message", None) or exc).strip()
        first = message.splitlines()[0] if message else type(exc).__name__
        raise ConfigError(f"{where}: Ray rejects the config: {first}") from None


def _cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.config)
    config = _load(path)
    if left := list(_placeholders({k: config.get(k) for k in ("provider", "auth")})):
        raise ConfigError(f"{path}: fill in {'; '.join(left)}")
    settings = _settings(config, str(path))
    _ray_validate(config, str(path))
    key = Path(str((config.get("auth") or {}).get("ssh_private_key", ""))).expanduser()
    if not key.is_file():
        raise ConfigError(f"{path}: auth.ssh_private_key {key} is not a file")
    mounts = config.get("file_mounts") or {}
    if PASSWORD_FILE not in mounts:
        raise ConfigError(
            f"{path}: file_mounts lacks {PASSWORD_FILE}: {PASSWORD_FILE} (the MLflow admin's "
            "password, as in the repository's cluster.yaml)"
        )
    for remote, local in mounts.items():
        if remote == PASSWORD_FILE and create_password(Path(str(local)).expanduser()):
            print(f"made the MLflow admin's password: {local} (mode 600)")
        if not Path(str(local)).expanduser().exists():
            hint = " (run `ray get-auth-token --generate`)" if "auth_token" in str(remote) else ""
            raise ConfigError(f"{path}: file_mounts {remote}: {local} does not exist here{hint}")
    workers = config["provider"].get("worker_ips") or []
    user = config["auth"].get("ssh_user")
    head = settings["head_ip"]
    print(
        f"ok: head {head}, {len(workers)} worker(s) with {settings['gpus']} GPU(s) each, "
        f"run storage {settings['storage']}, tracking store {settings['store']}"
    )
    quoted = shlex.quote(str(path))
    sweep = (
        "cd ~/segtune && python -m segtune.run sweeps/task3.yaml --address auto "
        "--set tune.storage_path=$SEGTUNE_RUN_STORAGE"
    )
    print(
        "next:\n"
        f"  ray up -y {quoted}\n"
        f"  ray exec {quoted} 'ray status'\n"
        f"  ray exec {quoted} {shlex.quote(sweep)}\n"
        f"  ssh -N -i {key} -L {TRACKING_PORT}:{head}:{TRACKING_PORT} {user}@{head}"
        f"   # the MLflow UI at http://localhost:{TRACKING_PORT}: user {ADMIN_USER}, password in "
        f"{mounts[PASSWORD_FILE]}\n"
        f"  ray dashboard {quoted}   # Ray's dashboard at http://localhost:8265 (asks for the token)\n"
        f"  ray down -y {quoted}"
    )
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    path = Path(args.bootstrap)
    settings = _settings(_load(path), str(path))
    head = settings["head_ip"]
    exports = {
        "RAY_AUTH_MODE": "token",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "SEGTUNE_HEAD_IP": head,
        "SEGTUNE_GPUS_PER_WORKER": str(settings["gpus"]),
        "SEGTUNE_TRACKING_STORE": settings["store"],
        "SEGTUNE_RUN_STORAGE": settings["storage"],
        "MLFLOW_TRACKING_URI": f"http://{head}:{TRACKING_PORT}",
        "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
    }
    if settings["mirror"]:
        exports[WEIGHTS_MIRROR_ENV] = settings["mirror"]
    print(f"# written by `python -m segtune.cluster env {path}` on the head; read by ~/.bashrc")
    print('export PATH="$HOME/segtune/.venv/bin:$PATH"')
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(str(value))}")
    print(password_export())
    return 0


def _as_root(command: list[str]) -> list[str]:
    return command if os.geteuid() == 0 else ["sudo", "-n", *command]


def _run(command: list[str]) -> str:
    log.info("$ %s", shlex.join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"{shlex.join(command)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _cmd_tracking_store(args: argparse.Namespace) -> int:
    store = os.environ.get("SEGTUNE_TRACKING_STORE", "sqlite")
    STATE_DIR.expanduser().mkdir(parents=True, exist_ok=True)
    if store != "postgresql":
        print(f"tracking store: sqlite in {STATE_DIR}")
        return 0
    if not shutil.which("pg_ctlcluster"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "postgresql"],
        ):
            subprocess.run(_as_root(command), check=True, env=env)
    _run(_as_root(["service", "postgresql", "start"]))
    user = os.environ.get("USER") or os.getlogin()
    psql = _as_root(["runuser", "-u", "postgres", "--", "psql", "-tAc"])
    if not _run([*psql, f"SELECT 1 FROM pg_roles WHERE rolname = '{user}'"]).strip():
        _run([*psql, f'CREATE ROLE "{user}" LOGIN'])
    if not _run([*psql, "SELECT 1 FROM pg_database WHERE datname = 'segtune'"]).strip():
        _run([*psql, f'CREATE DATABASE segtune OWNER "{user}"'])
    print(f"tracking store: PostgreSQL database segtune, role {user} (peer authentication)")
    return 0


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


def _server_command(host: str, port: int, store: str, workers: int) -> list[str]:
    state = STATE_DIR.expanduser()
    backend = POSTGRES_URI if store == "postgresql" else f"sqlite:///{state}/mlflow.db"
    return [*server_command(host, port, backend, state / "mlartifacts", workers), *AUTH_APP]


def _stop_previous(pid_file: Path) -> None:
    """A second `ray up` starts afresh: the old supervisor goes first (it frees its port)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            os.killpg(pid, 0)
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)


def _detach(name: str, args: list[str]) -> subprocess.Popen[bytes]:
    """`python -m segtune.cluster NAME --supervise ARGS` in its own session, outliving the SSH
    command that starts it; its pid in STATE_DIR/NAME.pid, its output in STATE_DIR/NAME.log."""
    state = STATE_DIR.expanduser()
    state.mkdir(parents=True, exist_ok=True)
    _stop_previous(state / f"{name}.pid")
    command = [sys.executable, "-m", "segtune.cluster", name, "--supervise", *args]
    with (state / f"{name}.log").open("ab") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    (state / f"{name}.pid").write_text(str(proc.pid))
    return proc


def _until_head_gone(
    head: str, port: int = RAY_PORT, child: subprocess.Popen[bytes] | None = None
) -> bool:
    """Wait while the head's Ray answers (and `child` runs): True once the head has missed three
    checks two seconds apart, False when `child` exited first."""
    misses = 0
    while child is None or child.poll() is None:
        time.sleep(2)
        misses = 0 if _port_open(head, port) else misses + 1
        if misses >= 3:
            return True
    return False


def _cmd_tracking_server(args: argparse.Namespace) -> int:
    host = args.host or os.environ.get("SEGTUNE_HEAD_IP")
    if not host:
        raise ConfigError("no --host and no SEGTUNE_HEAD_IP (written to .cluster.env by `env`)")
    store = os.environ.get("SEGTUNE_TRACKING_STORE", "sqlite")
    password = read_password(Path(PASSWORD_FILE).expanduser())  # before `ray up` goes on
    if args.supervise:
        command = _server_command(host, args.port, store, args.workers)
        auth = server_env(STATE_DIR.expanduser(), password)
        server = subprocess.Popen(
            command, env={**os.environ, **SERVER_POOL, **auth}, start_new_session=True
        )
        _stop_group_on_sigterm(server)
        if _until_head_gone(host, args.ray_port, server):
            log.info("the head's Ray is gone: stopping the MLflow server")
            stop_process_group(server)
        return server.returncode or 0
    options = [("--host", host), ("--port", args.port), ("--ray-port", args.ray_port),
               ("--workers", args.workers)]  # fmt: skip
    supervisor = _detach("tracking-server", [str(x) for option in options for x in option])
    url = f"http://{host}:{args.port}"
    deadline = time.monotonic() + args.timeout
    while server_health(url, timeout=2) is not None:
        if supervisor.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(supervisor.pid, signal.SIGTERM)
            log_file = STATE_DIR.expanduser() / "tracking-server.log"
            tail = log_file.read_text(errors="replace")[-2000:]
            raise ConfigError(
                f"the MLflow server did not answer at {url} in {args.timeout} s:\n{tail}"
            )
        time.sleep(0.5)
    print(f"tracking server: {url} ({store} store, log {STATE_DIR}/tracking-server.log, "
          f"login {ADMIN_USER} with {PASSWORD_FILE})")  # fmt: skip
    return 0


def _cmd_follow_head(args: argparse.Namespace) -> int:
    head = args.head or os.environ.get("RAY_HEAD_IP")
    if not head:
        raise ConfigError("no --head and no RAY_HEAD_IP (Ray sets it for worker commands)")
    if not args.supervise:
        _detach("follow-head", ["--head", head])
        print(f"this worker's Ray stops when the head's ({head}) does")
        return 0
    if _until_head_gone(head):
        log.info("the head's Ray is gone: stopping this worker's Ray")
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop"], check=False)
    return 0


def _stop_group_on_sigterm(proc: subprocess.Popen[bytes]) -> None:
    def stop(*_: object) -> None:
        stop_process_group(proc)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("python -m segtune.cluster", __doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a filled-in cluster.yaml before `ray up`")
    check.add_argument("config")
    check.set_defaults(run=_cmd_check)
    env = sub.add_parser("env", help="the shell exports of the head's settings (.cluster.env)")
    env.add_argument("bootstrap", help="~/ray_bootstrap_config.yaml, written by `ray up`")
    env.set_defaults(run=_cmd_env)
    store = sub.add_parser("tracking-store", help="prepare the MLflow server's store on the head")
    store.set_defaults(run=_cmd_tracking_store)
    server = sub.add_parser("tracking-server", help="start the MLflow server on the head")
    server.add_argument("--host", help="address to listen on (default: SEGTUNE_HEAD_IP)")
    server.add_argument("--port", type=int, default=TRACKING_PORT, help="the server's port")
    server.add_argument("--ray-port", type=int, default=RAY_PORT, help="the head's Ray (GCS) port")
    server.add_argument("--workers", type=int, default=4, help="server worker processes")
    server.add_argument("--timeout", type=float, default=60, help="seconds to wait for it")
    server.add_argument("--supervise", action="store_true", help=argparse.SUPPRESS)
    server.set_defaults(run=_cmd_tracking_server)
    follow = sub.add_parser("follow-head", help="stop this worker's Ray once the head's stops")
    follow.add_argument("--head", help="the head's address (default: RAY_HEAD_IP)")
    follow.add_argument("--supervise", action="store_true", help=argparse.SUPPRESS)
    follow.set_defaults(run=_cmd_follow_head)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
