"""The cluster's tracking server asks for credentials: MLflow's own basic-auth app
(`mlflow server --app-name basic-auth`), whose admin's password is made once on the launching
machine and reaches every node with the file mounts, beside Ray's token.

The password is only ever in its file (mode 0600) and in the environment of the processes that
use it: the server's (MLFLOW_AUTH_ADMIN_PASSWORD) and every node's shell, where `.cluster.env`
reads the file into MLFLOW_TRACKING_PASSWORD, which MLflow's client sends. Nothing prints it.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from segtune.errors import ConfigError

ADMIN_USER = "admin"
PASSWORD_FILE = "~/.ray/mlflow_admin_password"  # a file mount of cluster.yaml, like the token
AUTH_APP = ("--app-name", "basic-auth")
# what users other than the admin may do where nobody granted them more: read every experiment
# (the admin, who logs the sweeps, is never asked: MLflow lets an admin do everything)
DEFAULT_PERMISSION = "READ"
MIN_LENGTH = 12  # MLflow refuses a shorter admin password


def create_password(path: Path) -> bool:
    """Make the admin password file unless it exists; True when made now. It is private from
    its creation (O_EXCL, mode 0600): no moment where another user could read it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        read_password(path)  # an existing one must be usable too
        return False
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return True


def read_password(path: Path) -> str:
    """The admin password from its file, refused in one line when missing, short, or readable
    by other users (the message never quotes it)."""
    try:
        mode = path.stat().st_mode
        password = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the MLflow admin password ({exc.strerror}); "
            "`python -m segtune.cluster check` makes it, and cluster.yaml mounts it on every node"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: other users can read the MLflow admin password (mode "
            f"{stat.S_IMODE(mode):o}); chmod 600 {path}"
        )
    if len(password) < MIN_LENGTH:
        raise ConfigError(f"{path}: the MLflow admin password needs {MIN_LENGTH}+ characters")
    return password


def password_export() -> str:
    """The `.cluster.env` line that reads the password from the node's own copy of the file at
    each shell's start, so `.cluster.env` (synced with the checkout) never holds it."""
    rest = PASSWORD_FILE.removeprefix("~/")
    return f'export MLFLOW_TRACKING_PASSWORD="$(cat "$HOME/{rest}" 2>/dev/null)"'


def server_env(state: Path, password: str) -> dict[str, str]:
    """The environment of a basic-auth `mlflow server`: its config (`state/basic_auth.ini`; the
    users' database beside the tracking store, in `state`), the admin's password, and the static
    key MLflow needs for its forms (one per server start, shared by its workers)."""
    config, users = state / "basic_auth.ini", state / "basic_auth.db"
    database = f"sqlite:///{users}"
    config.write_text(
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = {database}\n"
        f"admin_username = {ADMIN_USER}\n"
    )
    if users.exists():
        _keep_admin_password(database, password)
    users.touch(mode=0o600)  # made private (sqlite takes an empty file): it holds the hashes
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }


def _keep_admin_password(database: str, password: str) -> None:
    """MLflow sets the admin's password only when it creates the admin: a password file made
    anew (another launching machine, a lost ~/.ray) would leave every node refused."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(database)
    try:
        if store.has_user(ADMIN_USER, use_primary=True) and not store.authenticate_user(
            ADMIN_USER, password, use_primary=True
        ):
            store.update_user(ADMIN_USER, password=password)
    finally:
        store.engine.dispose()
