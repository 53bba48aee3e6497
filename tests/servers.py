"""Real servers for tests, on loopback addresses or unix sockets only: an `mlflow server`, an S3
API (moto's server mode), PostgreSQL, a proxy that loses requests, and processes stopped by their
own process group, never by name."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from segtune.tracking.server import tracking_server
from tests.helpers import wait_for

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
            wait_for(ready, f"{command[0]} to start", timeout, process=proc, log=log, every=0.3)
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group this test started (its children included)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """segtune's own `mlflow server` on 127.0.0.1 (sqlite store, artifacts served, one worker,
    its pool setting); yields its URL."""
    store = f"sqlite:///{folder}/mlflow.db"
    with tracking_server(store, folder, workers=1, settle=False) as started:
        yield started.url


@contextlib.contextmanager
def s3_server(folder: Path, env: dict[str, str]) -> Iterator[str]:
    """An S3 API on 127.0.0.1 (moto's server mode); yields its endpoint URL."""
    port = free_port()
    command = [BIN / "moto_server", "-H", "127.0.0.1", "-p", port]
    with process(command, folder / "s3-server.log", lambda: port_open("127.0.0.1", port), env):
        yield f"http://127.0.0.1:{port}"


# --- PostgreSQL ------------------------------------------------------------------------------


def _postgres_bin(name: str) -> Path | None:
    """`name` from PATH, else from the newest of Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return Path(found)
    versions = Path("/usr/lib/postgresql").glob(f"*/bin/{name}")
    ranked = sorted(versions, key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return ranked[-1] if ranked else None


def _postgres_user() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL when the tests run as root (it refuses root); None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, and neither user postgres nor nobody exists")


def postgres_missing() -> str | None:
    """Why `postgres_server` cannot run here (a skip reason), or None."""
    for name in ("initdb", "postgres"):
        if _postgres_bin(name) is None:
            return f"PostgreSQL's {name} not found (Debian: apt-get install postgresql)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 missing (pip install -e '.[cluster]')"
    if os.geteuid() == 0:
        if not (shutil.which("setpriv") or shutil.which("runuser")):
            return "running as root without setpriv or runuser to drop to an unprivileged user"
        with contextlib.suppress(RuntimeError):
            _postgres_user()
            return None
        return "running as root, and neither user postgres nor nobody exists"
    return None


def _as_postgres_user(command: Sequence[str | Path]) -> list[str]:
    """`command` run as the unprivileged user when this runs as root (setpriv execs, so the
    process started is PostgreSQL itself), unchanged otherwise."""
    argv = [str(c) for c in command]
    user = _postgres_user()
    if user is None:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv:
        ids = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
        return [setpriv, *ids, "--", *argv]
    return ["runuser", "-u", user.pw_name, "--", *argv]


@contextlib.contextmanager
def postgres_server(
    folder: Path, database: str = "segtune", settings: Mapping[str, str] | None = None
) -> Iterator[str]:
    """PostgreSQL on a unix socket only (no TCP), trust authentication, database `database`,
    PostgreSQL's defaults but for `settings` (e.g. {"max_connections": "300"}); yields its
    SQLAlchemy URI for mlflow. Its log is `folder/postgres.log`.

    Data and socket live in a short /tmp folder: a socket path must stay under ~100 bytes, and
    the unprivileged user must reach it (pytest's folders are private to root).
    """
    import psycopg2

    runtime = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))
    try:
        data, sockets = runtime / "data", runtime / "sock"
        sockets.mkdir()
        user = _postgres_user()
        if user is not None:
            for path in (runtime, sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        initdb = [_postgres_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync"]  # fmt: skip
        done = subprocess.run(_as_postgres_user(initdb), cwd=runtime, capture_output=True)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {(done.stdout + done.stderr).decode()[-3000:]}")
        connect = {"user": "postgres", "host": str(sockets)}

        def ready() -> bool:
            try:
                psycopg2.connect(dbname="postgres", **connect).close()
                return True
            except psycopg2.OperationalError:
                return False

        command = [_postgres_bin("postgres"), "-D", data, "-k", sockets,
                   "-c", "listen_addresses="]  # fmt: skip
        for name, value in (settings or {}).items():
            command += ["-c", f"{name}={value}"]
        with process(_as_postgres_user(command), folder / "postgres.log", ready) as proc:
            try:
                conn = psycopg2.connect(dbname="postgres", **connect)
                conn.autocommit = True
                with conn.cursor() as cursor:
                    cursor.execute(f'CREATE DATABASE "{database}"')
                conn.close()
                yield f"postgresql+psycopg2://postgres@/{database}?host={sockets}"
            finally:
                # a fast shutdown by the postmaster: its children each have their own process
                # group, so only it stops them all (and frees the shared memory); the group is
                # killed after in any case, and children left alone exit when it is gone
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


# --- a server that loses writes --------------------------------------------------------------


@contextlib.contextmanager
def lossy_proxy(upstream: str, drop: Callable[[str, bytes], bool]) -> Iterator[str]:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` that answers `200 {}` without passing
    on the requests `drop(path, body)` picks: a tracking server that acknowledges and loses
    writes. Yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload, kind = 200, b"{}", "application/json"
            if not drop(self.path, body):
                request = urllib.request.Request(
                    upstream + self.path, data=body or None, method=self.command
                )
                if self.headers.get("Content-Type"):
                    request.add_header("Content-Type", self.headers["Content-Type"])
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, payload = answer.status, answer.read()
                        kind = answer.headers.get("Content-Type", kind)
                except urllib.error.HTTPError as exc:
                    status, payload = exc.code, exc.read()
                    kind = exc.headers.get("Content-Type", kind)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = forward

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def drop_first_metrics_batch() -> Callable[[str, bytes], bool]:
    """A `lossy_proxy` rule: lose the first `log-batch` request that carries metrics."""
    lock, dropped = threading.Lock(), [False]

    def drop(path: str, body: bytes) -> bool:
        if not path.endswith("/runs/log-batch") or not json.loads(body or b"{}").get("metrics"):
            return False
        with lock:
            first, dropped[0] = not dropped[0], True
        return first

    return drop
