"""One rule for whether a tracking server answers, asked of real HTTP servers: the pre-flight,
the outage watch and the cluster's checks all use it, and no message shows a password."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from segtune.errors import ConfigError
from segtune.tracking.address import (
    PASSWORD_ENV,
    USER_ENV,
    bare_uri,
    check_tracking_uri,
    create_store_whole,
    public_uri,
    resolve_tracking_uri,
    server_health,
    take_credentials,
)
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[1]


class Answers(http.server.BaseHTTPRequestHandler):
    """/health answers `health`, MLflow's REST API answers `api`."""

    health, api = 200, 404

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        code = self.api if self.path.startswith("/api/2.0/mlflow/") else self.health
        code = code if self.path.startswith(("/health", "/api/")) else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("health", "api", "expected"),
    [
        (200, 404, None),
        (401, 401, None),  # a server that asks for credentials is there
        (404, 200, None),  # a proxy that routes MLflow's API and not /health
        (404, 404, "a web server answers at http://{host}, but not MLflow's"),
        (502, 502, "HTTP 502 from http://{host}"),  # a proxy whose server is gone
    ],
)
def test_a_server_answers_by_one_rule(
    web_server: str, health: int, api: int, expected: str | None
) -> None:
    Answers.health, Answers.api = health, api
    uri = f"http://me:secret@{web_server}"
    problem = server_health(uri, timeout=2)
    if expected is None:
        assert problem is None
        check_tracking_uri(uri)  # the pre-flight accepts what the watch accepts
        return
    assert problem is not None and problem.startswith(expected.format(host=web_server)), problem
    with pytest.raises(ConfigError) as raised:
        check_tracking_uri(uri)
    message = str(raised.value)
    assert problem in message and f"tracking URI http://{web_server}: " in message, message
    assert "secret" not in message and "me@" not in message


def test_nothing_listening_is_refused_in_seconds() -> None:
    with pytest.raises(ConfigError, match=r"no answer within 1 s from http://127\.0\.0\.1:9 "):
        check_tracking_uri("http://u:pw@127.0.0.1:9", timeout=1)


@pytest.mark.parametrize(
    ("uri", "bare"),
    [
        ("http://alice:s3cret@host:5000", "http://host:5000"),
        ("https://alice:s3cret@host/mlflow/?x=1#f", "https://host/mlflow/?x=1#f"),
        ("http://alice@host:5000/", "http://host:5000/"),  # a user without a password
        ("http://alice:p@ss@host:5000", "http://host:5000"),  # an @ left unquoted in it
        ("http://alice:s3cret@[fd00::5]:5000/x", "http://[fd00::5]:5000/x"),
        ("http://[fd00::5]:5000", "http://[fd00::5]:5000"),
        ("http://host:5000", "http://host:5000"),
        ("sqlite:///path/mlflow.db", "sqlite:///path/mlflow.db"),
        ("file:./mlruns", "file:./mlruns"),
        ("file:///a@b/mlruns", "file:///a@b/mlruns"),
        ("postgresql://me:secret@db:5432/x", "postgresql://me:secret@db:5432/x"),
        ("http://[::1", "http://[::1"),  # not an address: as written
    ],
)
def test_bare_uri_drops_a_servers_user_info_only(uri: str, bare: str) -> None:
    assert bare_uri(uri) == bare


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://me:secret@db:5432/x", "postgresql://me:***@db:5432/x"),
        ("http://me:secret@host:5000", "http://host:5000"),  # the browser asks
        ("http://me@host:5000", "http://host:5000"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("http://[::1", "http://[::1"),  # no address: shown as written
    ],
)
def test_public_uri_shows_no_password(uri: str, shown: str) -> None:
    assert public_uri(uri) == shown


def test_a_uris_credentials_become_mlflows_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user and password (percent-decoded) go where MLflow reads them; the URI used, and
    MLFLOW_TRACKING_URI that child processes inherit, are left without them."""
    monkeypatch.setenv(USER_ENV, "old")
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:pw2@other:5000")
    assert resolve_tracking_uri("http://al%40ice:s3c%3Aret@host:5000/") == "http://host:5000/"
    assert (os.environ[USER_ENV], os.environ[PASSWORD_ENV]) == ("al@ice", "s3c:ret")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://other:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:pw2@other:5000")
    assert resolve_tracking_uri() == "http://other:5000"  # the variable's, when it is the one used
    assert (os.environ[USER_ENV], os.environ[PASSWORD_ENV]) == ("bob", "pw2")
    assert take_credentials("http://carol@host:5000") == "http://host:5000"  # no password: kept
    assert (os.environ[USER_ENV], os.environ[PASSWORD_ENV]) == ("carol", "pw2")
    assert take_credentials("postgresql://u:pw@db/x") == "postgresql://u:pw@db/x"
    assert os.environ[USER_ENV] == "carol"


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "file:./mlruns", "postgresql://u:pw@db/x"])
def test_a_store_without_a_server_has_nothing_to_reach(uri: str) -> None:
    """The sweep's run closing and the node checks ask every store; only a server is probed."""
    assert server_health(uri, timeout=0.1) is None


# Inside the namespace: a name server on the namespace's own loopback that takes every query
# and never answers; the head check and the tracking check, each with a 2 s timeout
SILENT_RESOLVER = r"""
import json, socket, sys, threading, time
from segtune.errors import ConfigError
from segtune.sweep.ray_init import check_head
from segtune.tracking.address import check_tracking_uri

server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.1", 53))
queries = []
threading.Thread(target=lambda: [queries.append(server.recv(512)) for _ in iter(int, 1)],
                 daemon=True).start()
found = {}
for name, check in (("head", lambda: check_head("head.segtune.test:6379", timeout=2)),
                    ("tracking", lambda: check_tracking_uri("http://mlflow.segtune.test:5000", 2))):
    started = time.monotonic()
    try:
        check()
        message = None
    except ConfigError as exc:
        message = str(exc)
    found[name] = (message, time.monotonic() - started)
print(json.dumps({**found, "queries": len(queries)}))
"""


def test_a_name_no_resolver_answers_is_one_line_within_the_timeout(tmp_path: Path) -> None:
    """The C resolver would wait its attempts x timeout (10 s and more) for a name server that
    never answers; `check_head` and the tracking check give up on the lookup at their timeout.
    Run in a network and mount namespace of the test's own, whose /etc/resolv.conf names a
    server on its loopback that the test holds (and /etc/nsswitch.conf asks files, then DNS)."""
    if os.geteuid() != 0:
        pytest.skip("a network and mount namespace needs root")
    if not (shutil.which("unshare") and shutil.which("ip")):
        pytest.skip("unshare or ip is not installed (Debian: util-linux, iproute2)")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (tmp_path / "nsswitch.conf").write_text("hosts: files dns\n")
    inside = (
        f"ip link set lo up && mount --bind {tmp_path / 'resolv.conf'} /etc/resolv.conf && "
        f"mount --bind {tmp_path / 'nsswitch.conf'} /etc/nsswitch.conf && "
        f'exec {sys.executable} -c "$0"'
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c", inside, SILENT_RESOLVER],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["queries"] >= 1  # the resolver asked the silent server
    for check, host in (("head", "head.segtune.test"), ("tracking", "mlflow.segtune.test")):
        message, seconds = found[check]
        assert message is not None and "\n" not in message, message
        assert f"{host} did not resolve within 2 s" in message, message
        assert seconds < 2 + 2, (check, seconds)


def test_a_new_sqlite_store_is_whole_or_absent_after_a_kill_during_its_migration(
    tmp_path: Path,
) -> None:
    """The process that makes the store is killed while MLflow migrates its partial file: the
    store's own name is then absent (never a half-migrated file), and the next call makes it
    whole. An existing store is left byte for byte as it is."""
    path = tmp_path / "mlflow.db"
    uri = f"sqlite:///{path}"
    code = f"from segtune.tracking.address import create_store_whole; create_store_whole({uri!r})"
    maker = subprocess.Popen([sys.executable, "-c", code])
    wait_for(lambda: list(tmp_path.glob(".mlflow.db.partial-*")), "the partial store", 60,
             process=maker)  # fmt: skip
    maker.kill()
    maker.wait()
    assert not path.exists() or _experiments(uri) == ["Default"]
    create_store_whole(uri)
    assert _experiments(uri) == ["Default"]
    assert not list(tmp_path.glob(".mlflow.db.partial-*"))  # the killed maker's file removed
    before = path.read_bytes()
    create_store_whole(uri)
    assert path.read_bytes() == before


def _experiments(uri: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    return [e.name for e in MlflowClient(uri).search_experiments()]
