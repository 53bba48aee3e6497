"""The tracking URI: which one a command uses, what of it may be printed, and whether the
store behind it can work, asked once in seconds (MLflow's own client retries for minutes).

One health rule for every caller: the pre-flight of each command, the sweep's watch over an
outage, the cluster's supervisor and the node checks all ask `server_health`. Its name lookup,
and `sweep.ray_init.check_head`'s, is bounded by the same timeout (`connect_within`).

A server's credentials never travel in its URI: `resolve_tracking_uri` moves a URI's user info
into MLflow's own variables (MLFLOW_TRACKING_USERNAME/PASSWORD), and every link, message, file
and process after it sees the URI without them. MLflow takes credentials from those variables
only; a password left in the URI would be sent all the same (by `requests`), but MLflow writes
the URL into its errors, which reach logs and the trials' error tags.
"""

from __future__ import annotations

import glob
import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from segtune.cli import check_out_folder
from segtune.errors import ConfigError

USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
STORE_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
START_HINT = "start the server (mlflow server --host 127.0.0.1 --port PORT) or fix --tracking-uri"


def resolve_tracking_uri(cli_value: str | None = None) -> str:
    """`--tracking-uri`, else MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db);
    a server's user info moved into this process's MLflow credentials (`take_credentials`), and
    out of MLFLOW_TRACKING_URI too, which the processes it starts inherit."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        os.environ["MLFLOW_TRACKING_URI"] = bare_uri(env_uri)
    if cli_value or env_uri:
        return take_credentials(cli_value or env_uri)
    import mlflow  # here: the supervisor and the load test import this module without MLflow

    return mlflow.get_tracking_uri()


def bare_uri(uri: str) -> str:
    """A server's URI without its user info (scheme, host, port, path kept): what a link, a
    command to repeat or a file that travels holds; the browser asks for the credentials. Any
    other URI (a file or database store, not an address) as it is."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:  # not an address (a bracket left open)
        return uri
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def take_credentials(uri: str) -> str:
    """`bare_uri(uri)`, the user and password of a server's URI set as this process's
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the URI's win over the variables':
    they were given for this server); the processes it starts inherit them, and Ray's trials
    get them through `sweep.ray_init`."""
    bare = bare_uri(uri)
    if bare == uri:
        return uri
    user, _, password = urllib.parse.urlsplit(uri).netloc.rpartition("@")[0].partition(":")
    if user:
        os.environ[USER_ENV] = urllib.parse.unquote(user)
    if password:
        os.environ[PASSWORD_ENV] = urllib.parse.unquote(password)
    return bare


def public_uri(uri: str) -> str:
    """`uri` fit for a message, a link, a table or a file that travels: a server's without its
    user info (`bare_uri`), a database's with its password as ***."""
    uri = bare_uri(uri)
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:  # not an address (a bracket left open): shown as the user wrote it
        return uri
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


class LookupTimeout(TimeoutError):
    """A host name that the resolver did not answer for in time."""


def lookup(host: str, port: int, timeout: float) -> list[tuple[Any, ...]]:
    """`socket.getaddrinfo` for a TCP connection, answered within `timeout` seconds or
    LookupTimeout: the C resolver has no timeout a caller sets (a name server that never answers
    costs its attempts x timeout, 10 s by default, per address family), so it runs in a daemon
    thread, left behind when late."""
    found: list[tuple[Any, ...]] = []
    failed: list[OSError] = []

    def resolve() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=resolve, name=f"lookup {host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LookupTimeout(f"{host} did not resolve within {timeout:g} s")
    if failed:
        raise failed[0]
    return found


def connect_within(
    address: tuple[str, int], timeout: float, source_address: tuple[str, int] | None = None
) -> socket.socket:
    """`socket.create_connection`, its name lookup included in `timeout` (`lookup`); each of
    the name's addresses tried in turn with the time left."""
    deadline = time.monotonic() + timeout
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in lookup(address[0], address[1], timeout):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            errors.append(exc)
    raise errors[0] if errors else OSError(f"{address[0]}: no address to connect to")


class _Bounded:
    """http.client's connection, its socket made by `connect_within` (http.client's own hook
    for it, `_create_connection`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = connect_within


class _HTTP(_Bounded, http.client.HTTPConnection):
    pass


class _HTTPS(_Bounded, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTP, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPS, req, context=self._context)


_OPENER = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)  # urllib's, lookups bounded


def is_server(tracking_uri: str) -> bool:
    return urllib.parse.urlsplit(tracking_uri).scheme in ("http", "https")


def server_health(url: str, timeout: float = 5.0) -> str | None:
    """None when the tracking server at `url` answers, or `url` is a file or database store
    (no server to reach), else why not, naming it without its credentials. A server answers
    when /health does, when it asks for credentials (401, 403), or, behind a proxy that routes
    only MLflow's REST API, when that API does."""
    if not is_server(url):
        return None
    parts = urllib.parse.urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path.rstrip('/')}"
    try:
        with _OPENER.open(f"{base}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403) or (exc.code == 404 and _answers_mlflow(base, timeout)):
            return None
        if exc.code == 404:
            return f"a web server answers at {base}, but not MLflow's (404 for /health and its API)"
        return f"HTTP {exc.code} from {base}"
    except (OSError, ValueError, http.client.HTTPException) as exc:  # e.g. a half-started server
        reason = getattr(exc, "reason", None) or exc
        return f"no answer within {timeout:g} s from {base} ({reason})"


def _answers_mlflow(base: str, timeout: float) -> bool:
    """Whether MLflow's REST API is there (a proxy may route it and not /health)."""
    try:
        url = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        with _OPENER.open(url, timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code != 404  # 401 or 403: a server that wants credentials
    except (OSError, ValueError, http.client.HTTPException):
        return False


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Refuse a tracking URI that cannot work, before anything starts: a scheme MLflow has no
    store for, a malformed address, a database whose driver is missing, a server that does not
    answer within `timeout` seconds."""
    shown = public_uri(uri)
    try:
        parsed = urllib.parse.urlsplit(uri)
        parsed.port  # noqa: B018 - parses the port, and raises on a bad one
    except ValueError as exc:
        raise ConfigError(f"tracking URI {shown!r}: not a valid address ({exc})") from None
    scheme = parsed.scheme.split("+")[0]
    if scheme and scheme not in STORE_SCHEMES and len(scheme) > 1:  # C:\... is a path
        raise ConfigError(
            f"tracking URI {shown!r}: MLflow has no store for {parsed.scheme}://; use "
            "http(s)://HOST:PORT, sqlite:///PATH, file:PATH or a database URI"
        )
    if scheme == "sqlite" and ":///" in uri:  # the database's folder (made when missing)
        check_out_folder(Path(uri.split(":///", 1)[1]).parent, "tracking URI")
    elif scheme in ("postgresql", "mysql", "mssql"):
        _check_driver(uri, shown)
    problem = server_health(uri, timeout)
    if problem is not None:
        raise ConfigError(f"tracking URI {shown}: {problem}; {START_HINT}")


def create_store_whole(uri: str) -> None:
    """A new sqlite store is made under a partial name and linked into place once MLflow has
    made its tables: a driver killed during MLflow's schema migration (seconds, on a first
    run) would leave a file that every later command fails on ("duplicate column name")."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return
    path = Path(uri[len("sqlite:///") :])
    if path.exists():
        return
    from mlflow.tracking import MlflowClient

    for left in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        if not _alive(left.name.rpartition("-")[2]):  # a maker killed: its file is ours to remove
            left.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)
        os.link(partial, path)  # never over a store another process made meanwhile
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    """Whether the process of a partial file's pid is still there."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _check_driver(uri: str, shown: str) -> None:
    """A database URI whose Python driver is not installed: one line, not SQLAlchemy's error
    after the trials' start."""
    from sqlalchemy.engine import make_url

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ImportError as exc:
        raise ConfigError(
            f"tracking URI {shown!r}: its database driver is not installed ({exc}); install it, "
            "or name an installed one in the scheme (e.g. postgresql+psycopg2://)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a URI SQLAlchemy cannot read
        raise ConfigError(f"tracking URI {shown!r}: not a database URI ({exc})") from None
