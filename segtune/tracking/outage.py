"""A tracking server that goes away during a sweep: survived for `mlflow.outage_s`, then the
sweep stops with its state saved.

Meanwhile every MLflow call of the driver and of the trials retries (MLflow's own client
retries, sized here): a trial waits at its next log call, at the end of an epoch, and goes on
when the server is back. The driver watches the server's /health; once it has not answered for
`outage_s` seconds it stops the trials as a first Ctrl-C does (Tune saves the experiment state)
and ends with one line that says so, leaving its runs to the next driver to close.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from segtune.tracking.address import is_server, server_health

log = logging.getLogger(__name__)

PROBE_S = 2.0  # how often the driver asks the server's /health
MAX_RETRIES = 10  # MLflow's limit on MLFLOW_HTTP_REQUEST_MAX_RETRIES
MAX_BACKOFF_S = 120.0  # urllib3's cap on one wait between retries
# the driver's own calls outlast its watch of the server a little, and the trials' calls by a
# minute: the watch decides when the sweep stops, never a call that gave up first
DRIVER_MARGIN_S, TRIAL_MARGIN_S = 15.0, 60.0


def retry_span(retries: int, factor: int) -> float:
    """Seconds urllib3 waits in all over `retries` failed attempts at `factor`: no wait after
    the first, then factor * 2^(k-1) after the k-th, at most MAX_BACKOFF_S each (jitter aside)."""
    return sum(min(MAX_BACKOFF_S, factor * 2 ** (k - 1)) for k in range(2, retries + 1))


def retry_env(outage_s: float) -> dict[str, str]:
    """MLflow client settings whose retries last at least `outage_s` seconds with the shortest
    longest wait, so a call goes on soon after a server comes back (MLflow caps the retries at
    10; its backoff factor is a whole number of seconds)."""
    fits = [
        (min(MAX_BACKOFF_S, factor * 2 ** (retries - 1)), span, retries, factor)
        for factor in range(1, 121)
        for retries in range(2, MAX_RETRIES + 1)
        if (span := retry_span(retries, factor)) >= outage_s
    ]
    _, _, retries, factor = min(fits) if fits else (0, 0, MAX_RETRIES, 120)
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(factor),
    }


def trial_retry_env(tracking_uri: str, outage_s: float) -> dict[str, str]:
    """The trials' retry settings: longer than the driver's watch; none for a local store."""
    return retry_env(outage_s + TRIAL_MARGIN_S) if is_server(tracking_uri) else {}


def use_driver_retries(tracking_uri: str, outage_s: float) -> None:
    """Size this process's (the driver's) MLflow retries to just outlast its watch."""
    if is_server(tracking_uri):
        os.environ.update(retry_env(outage_s + DRIVER_MARGIN_S))


@contextmanager
def watch_server(
    tracking_uri: str, outage_s: float, on_lost: Callable[[str], bool]
) -> Iterator[None]:
    """While the block runs, ask the server's /health every PROBE_S seconds; after `outage_s`
    seconds without an answer call `on_lost(message)` (from the watching thread) until it
    returns True, that it acted; never once the block has ended."""
    if not is_server(tracking_uri):
        yield
        return
    done = threading.Event()

    def watch() -> None:
        down_since: float | None = None
        while not done.wait(PROBE_S):
            problem = server_health(tracking_uri, timeout=PROBE_S)
            if problem is None:
                if down_since is not None:
                    log.warning("the tracking server answers again")
                down_since = None
                continue
            now = time.monotonic()
            if down_since is None:
                down_since = now
                log.warning("tracking server lost (%s); the sweep waits up to %g s", problem,
                            outage_s)  # fmt: skip
            elif now - down_since < outage_s or done.is_set():
                continue
            elif on_lost(f"the tracking server did not answer for {outage_s:g} s ({problem})"):
                return  # else Tune cannot stop gracefully yet: ask again at the next probe

    thread = threading.Thread(target=watch, name="segtune-tracking-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=PROBE_S * 3)
