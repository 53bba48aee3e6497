"""Real servers for tests, on loopback addresses only: an `mlflow server`, an S3 API (moto's
server mode), and processes stopped by their own process group, never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """An HTTP server answers at `url` (any status)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


@contextlib.contextmanager
def process(
    command: Sequence[str | Path],
    log: Path,
    ready: Callable[[], bool],
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own process group, up when `ready()`; the whole group is killed after."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(c) for c in command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not start: {log.read_text()[-3000:]}")
                time.sleep(0.3)
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group this test started (its children included)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def mlflow_server(folder: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """An `mlflow server` with a sqlite store, serving artifacts itself; yields its URL."""
    port = free_port(host)
    url = f"http://{host}:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", port,
               "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
               "--artifacts-destination", folder / "artifacts", "--serve-artifacts",
               "--workers", "1", "--allowed-hosts", f"{host}:{port},localhost:{port}"]  # fmt: skip
    with process(command, folder / "mlflow-server.log", lambda: answers(f"{url}/health")):
        yield url


@contextlib.contextmanager
def s3_server(folder: Path, env: dict[str, str]) -> Iterator[str]:
    """An S3 API on 127.0.0.1 (moto's server mode); yields its endpoint URL."""
    port = free_port()
    command = [BIN / "moto_server", "-H", "127.0.0.1", "-p", port]
    with process(command, folder / "s3-server.log", lambda: port_open("127.0.0.1", port), env):
        yield f"http://127.0.0.1:{port}"
