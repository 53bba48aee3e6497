"""Ray's start for a sweep's driver, on this machine or joining a cluster, with the environment
every trial process gets.

`segtune.run` calls it before its heavy imports (torch, the models, the trainable) and its
pre-flight, which a thread does meanwhile: Ray's start is mostly waiting for its own processes
(about 4 s on 2 cores), and those seconds used to come on top of the driver's own.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from typing import Any

import ray

from segtune.config.trial import WEIGHTS_MIRROR_ENV
from segtune.errors import ConfigError
from segtune.sweep.signals import StopSignals
from segtune.tracking.address import PASSWORD_ENV, USER_ENV, LookupTimeout, connect_within
from segtune.tracking.outage import trial_retry_env

# What ray.init imports on its own, imported with this module: the pre-flight thread imports
# beside ray.init, and no module is then imported by both threads at once (tests/test_layers.py;
# frozenlist brings Cython 3.1's shared module, which simplejpeg's also needs)
RAY_INIT_IMPORTS = ("ctypes.util", "email.policy", "socketserver", "timeit",
                    "ray._common.usage.usage_lib", "ray.dashboard", "frozenlist")  # fmt: skip
for _name in RAY_INIT_IMPORTS:
    importlib.import_module(_name)

log = logging.getLogger(__name__)


def runtime_env_vars() -> dict[str, str]:
    """Environment every trial process gets: no network call when albumentations is imported,
    no cloud metadata service asked when the driver's storage is a server of one's own,
    MLflow's log level (`cli.setup_logging`: its INFO lines only with -v), and the mirror of
    torchvision's weights, for every node's pre-flight and trials."""
    names = ("NO_ALBUMENTATIONS_UPDATE", "AWS_EC2_METADATA_DISABLED", "MLFLOW_LOGGING_LEVEL",
             WEIGHTS_MIRROR_ENV)  # fmt: skip
    return {name: os.environ[name] for name in names if name in os.environ}


class DefaultAuthNotice(logging.Filter):
    """Drops Ray's notice that a new local cluster has token authentication, its default: it
    came on every run, and before the one line of a pre-flight that fails while Ray starts.
    Ray's warning that authentication is off stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this")


AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _credentials_hook(values: dict[str, str]) -> Callable[[], None]:
    """The tracking server's credentials for every Ray worker, on any node: a setup hook goes
    pickled through Ray's GCS, where `env_vars` would be written out in each node's
    runtime_env_agent.log. A node's own variables (a cluster's .cluster.env) give way to the
    driver's."""

    def set_mlflow_credentials() -> None:
        os.environ.update(values)

    return set_mlflow_credentials


def check_head(address: str | None, timeout: float = 5.0) -> None:
    """A HOST:PORT that nothing answers at, or whose name does not resolve, is one line within
    `timeout` seconds (the lookup included: `connect_within`): Ray itself would retry its
    connection to the head's GCS for a minute. `auto`, `local` and `ray://` are Ray's."""
    if address is None or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    bare_ipv6 = ":" in host and not host.startswith("[")
    if not host or bare_ipv6 or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--address {address}: not HOST:PORT (or auto); e.g. 10.0.0.5:6379 or [fd00::5]:6379"
        )
    try:
        connect_within((host.strip("[]"), int(port)), timeout).close()
    except LookupTimeout as exc:
        reason = str(exc)
    except TimeoutError:
        reason = f"no answer within {timeout:g} s"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    else:
        return
    raise ConfigError(
        f"--address {address}: no Ray head answers there ({reason}); start one "
        "(ray start --head --port PORT) or give its GCS address"
    )


def start_ray(address: str | None, tracking_uri: str, outage_s: float, stop: StopSignals) -> None:
    """`ray.init` in this (the main) thread: Ray ties its processes to the thread that starts
    them. A signal meanwhile is the sweep's (`stop.starting_ray`); a cluster that cannot be
    joined is one line."""
    env = {
        "MLFLOW_TRACKING_URI": tracking_uri,
        **runtime_env_vars(),
        **trial_retry_env(tracking_uri, outage_s),
    }
    if not any(isinstance(f, DefaultAuthNotice) for f in logging.getLogger(AUTH_LOGGER).filters):
        logging.getLogger(AUTH_LOGGER).addFilter(DefaultAuthNotice())
    log.info("starting Ray (%s)", address or "this machine")
    if not log.isEnabledFor(logging.DEBUG):  # Ray's INFO lines in the driver only with -v
        logging.getLogger("ray").setLevel(logging.WARNING)
    runtime_env: dict[str, Any] = {"env_vars": env}
    credentials = {n: os.environ[n] for n in (USER_ENV, PASSWORD_ENV) if n in os.environ}
    if credentials:
        runtime_env["worker_process_setup_hook"] = _credentials_hook(credentials)
    options = dict(
        address=address,
        include_dashboard=False,
        runtime_env=runtime_env,
        configure_logging=False,
        log_to_driver=True,
    )
    try:
        with stop.starting_ray():
            if address:
                ray.init(**options)
                return
            try:  # a Ray of its own starts no idle task workers: trials are actors, which never
                # take them, and their imports took CPU from the pre-flight
                ray.init(**options, _system_config={"prestart_worker_first_driver": False})
            except ValueError as exc:  # Ray joins the cluster RAY_ADDRESS or `ray start` names
                if "_system_config" not in str(exc):
                    raise
                ray.init(**options)
    except ConnectionError as exc:
        raise ConfigError(f"--address {address}: {str(exc).strip().splitlines()[0]}") from None
