"""A local `mlflow server` to measure: started on 127.0.0.1 in its own process group, stopped
with all its processes whatever happens, and the checks of the URIs a load test is given.

The cluster's server (`segtune.cluster`) is supervised for days; this one lives for one
measurement, so it also waits until its start-up work is done and removes what it leaves behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from segtune.errors import ConfigError
from segtune.tracking.address import check_tracking_uri, is_server, public_uri, server_health

log = logging.getLogger(__name__)

# the stores `mlflow server --backend-store-uri` accepts (SQLAlchemy dialects, or files)
BACKEND_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file")
# environment variables of MLflow that change how the started server behaves under load
SERVER_SETTINGS = ("MLFLOW_SQLALCHEMYSTORE_", "MLFLOW_SERVER_")
# A database connection per session. mlflow 3.17's log_batch holds one session while it opens
# a second (sqlalchemy_store.py, log_batch): with SQLAlchemy's default pool (5 + 10 overflow in
# each server worker), ~15 concurrent requests hold every connection and wait for another until
# the 30 s pool timeout, and the epoch's values are lost (HTTP 400), on sqlite and PostgreSQL.
SERVER_POOL = {"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"}
HUEY_STORAGE_ENV = "_MLFLOW_HUEY_STORAGE_PATH"  # mlflow.server.constants.HUEY_STORAGE_PATH_ENV_VAR


def backend_kind(uri: str) -> str:
    """The database of a backend store URI (`postgresql+psycopg2://...` is `postgresql`)."""
    scheme = urlsplit(uri).scheme.split("+", 1)[0].lower()
    if scheme not in BACKEND_SCHEMES:
        raise ConfigError(
            f"--backend-store-uri {public_uri(uri)}: unsupported scheme {scheme or '(none)'!r}; "
            f"use one of {', '.join(s + '://' for s in BACKEND_SCHEMES)}"
        )
    return scheme


def server_command(
    host: str, port: int, backend_uri: str, artifacts: Path, workers: int
) -> list[str]:
    """`mlflow server` on `host:port` serving artifacts itself; run it with SERVER_POOL set."""
    allowed = f"{host}:{port},localhost:{port},127.0.0.1:{port}"
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
            "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
            "--serve-artifacts", "--workers", str(workers), "--allowed-hosts", allowed]  # fmt: skip


def check_server_uri(url: str) -> str:
    """An http(s) URL of a tracking server that answers now: the test needs a server, not a
    file store, and an unreachable one would fail 64 x 50 times instead of once."""
    if not is_server(url):
        raise ConfigError(f"--tracking-uri {public_uri(url)}: must be the http(s) URL of a server")
    check_tracking_uri(url)
    return url.rstrip("/")


@dataclass(frozen=True)
class StartedServer:
    url: str
    pid: int  # also its process group: the server's workers are stopped with it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM to the group this module started, SIGKILL to whatever is left after `grace`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):  # workers that outlived the main process
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group_members(pgid: int) -> Iterator[tuple[Path, list[str]]]:
    """(/proc/PID, stat fields from the state on) of each live process of group `pgid`."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # pgrp is the 3rd field
            yield entry, fields


def _group_cpu_s(pgid: int) -> float | None:
    """CPU seconds used so far by the live processes of group `pgid`; None without /proc."""
    if not Path("/proc/self/stat").exists():
        return None
    ticks = sum(int(f[11]) + int(f[12]) for _, f in _group_members(pgid))  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _job_queue_folder(pgid: int) -> Path | None:
    """The folder (in /dev/shm) where `mlflow server` keeps its job queues: it leaves it behind
    when it stops, so the server's stop removes it."""
    for entry, _ in _group_members(pgid):
        with contextlib.suppress(OSError):
            for item in (entry / "environ").read_bytes().split(b"\0"):
                name, _, value = item.decode(errors="replace").partition("=")
                folder = Path(value)
                # only a folder mkdtemp made: never remove anything else
                if name == HUEY_STORAGE_ENV and folder.name.startswith("tmp") and folder.is_dir():
                    return folder
    return None


def wait_until_idle(pgid: int, timeout: float = 60.0, busy: float = 0.1) -> float:
    """Wait until group `pgid` uses under `busy` of a CPU for a second; the seconds waited.

    `mlflow server` answers /health while its job runner still starts a handful of consumer
    processes (seconds of both cores of a small machine): a load test measures the server
    at work, not its start-up.
    """
    started = time.monotonic()
    before = _group_cpu_s(pgid)
    while before is not None and time.monotonic() - started < timeout:
        time.sleep(1.0)
        now = _group_cpu_s(pgid)
        if now is None or now - before < busy:
            break
        before = now
    else:
        if before is not None:
            log.warning("the server still uses the CPU after %.0f s; measuring anyway", timeout)
    return time.monotonic() - started


@contextlib.contextmanager
def tracking_server(
    backend_uri: str,
    folder: Path,
    workers: int = 4,
    timeout: float = 180.0,
    settle: bool = True,
    port: int | None = None,
) -> Iterator[StartedServer]:
    """`mlflow server` on 127.0.0.1 with `backend_uri`, serving artifacts from `folder`, on
    `port` (a free one by default).

    Its own process group, stopped on the way out whatever happens (error, Ctrl-C); its log is
    `folder/mlflow-server.log`, quoted when it does not start. With `settle`, yields once the
    server's start-up work is done (`wait_until_idle`).
    """
    backend_kind(backend_uri)
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    command = server_command("127.0.0.1", port, backend_uri, folder / "artifacts", workers)
    server_log = folder / "mlflow-server.log"
    with server_log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            env={**SERVER_POOL, **os.environ},  # a pool class set by the caller is measured
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        jobs = None
        try:
            deadline = time.monotonic() + timeout
            while server_health(url, timeout=2) is not None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = server_log.read_text(errors="replace")[-2000:]
                    how = "exited" if proc.poll() is not None else f"no answer in {timeout:.0f} s"
                    raise ConfigError(
                        f"mlflow server with --backend-store-uri {public_uri(backend_uri)} did not "
                        f"start ({how}); its log ({server_log}) ends:\n{tail}"
                    )
                time.sleep(0.3)
            log.info("mlflow server %s up (pid %d, %d workers)", url, proc.pid, workers)
            jobs = _job_queue_folder(proc.pid)
            if settle:
                log.info("its start-up work settled in %.0f s", wait_until_idle(proc.pid))
            yield StartedServer(url, proc.pid)
        finally:
            stop_process_group(proc)
            if jobs is not None:
                shutil.rmtree(jobs, ignore_errors=True)
