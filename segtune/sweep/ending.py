"""How a sweep that did not run to its end ends: its open runs closed where the store still takes
them (the next driver of the sweep closes the rest), and one line that says what happened and
whether `--resume` can continue (`SweepInterrupted`, with the exit status)."""

from __future__ import annotations

import logging
import re
import signal
import time

from mlflow.tracking import MlflowClient

from segtune.config.sweep import SweepConfig
from segtune.sweep.edits import SWEEP_STATE_FILE
from segtune.sweep.signals import StopSignals, SweepInterrupted
from segtune.sweep.storage import RunStorage
from segtune.tracking.runs import close_open_runs

log = logging.getLogger(__name__)

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its workers' messages
STOP_FILE = "segtune_stopped.txt"  # beside Ray's state: the line of the sweep's latest early end


def end_stopped(
    sweep: SweepConfig, tracking_uri: str, storage: RunStorage, parent: str, stop: StopSignals
) -> None:
    """After a signal: the sweep's open runs KILLED with it (exit 128 + its number). After the
    tracking server was given up: nothing written, since there is no server (exit 1). After a
    sweep given up whose store answers (no trial could start): its open runs KILLED (exit 1)."""
    if stop.lost is not None and stop.close_runs:
        closed = _close(sweep, tracking_uri, parent, f"stopped at {now()}: {stop.lost}")
        raise SweepInterrupted(
            f"sweep {sweep.name} stopped: {stop.lost}; {len(closed)} run(s) closed as KILLED",
            1,
            resumable(sweep, storage, parent),
        )
    if stop.lost is not None:
        raise SweepInterrupted(
            f"sweep {sweep.name} stopped: {stop.lost}; its runs stay RUNNING until the next "
            "driver of this sweep closes them",
            1,
            resumable(sweep, storage, parent),
        )
    assert stop.received is not None
    reason = f"stopped by {signal.Signals(stop.received).name} at {now()}"
    closed = _close(sweep, tracking_uri, parent, reason)
    raise SweepInterrupted(
        f"sweep {sweep.name} {reason}; {len(closed)} run(s) closed as KILLED",
        128 + stop.received,
        resumable(sweep, storage, parent),
    )


def end_failed(
    sweep: SweepConfig, tracking_uri: str, storage: RunStorage, parent: str, error: Exception
) -> None:
    """A fault of the driver itself (its disk full, its store or Ray gone): the open runs KILLED
    with the cause, and one line that names it (`-v` logs the traceback); exit 1."""
    what = _cause(error)
    log.debug("the sweep's driver failed", exc_info=error)
    closed = _close(sweep, tracking_uri, parent, f"its driver failed at {now()}: {what}")
    raise SweepInterrupted(
        f"sweep {sweep.name} failed in its driver ({what}); {len(closed)} run(s) closed as "
        "KILLED, any others by its next driver",
        1,
        resumable(sweep, storage, parent),
    ) from None


def _cause(error: BaseException) -> str:
    """`Type: first line` of the first error in the chain that Ray or Tune did not raise
    themselves (their wrappers say where, not what), else of the innermost one."""
    chain = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(inner)
    cause = next((e for e in chain if not type(e).__module__.startswith("ray.")), chain[-1])
    lines = ANSI.sub("", str(cause)).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:500]


def _close(sweep: SweepConfig, tracking_uri: str, parent: str, reason: str) -> list[str]:
    if not parent:  # no run exists yet (nor, maybe, a store)
        return []
    try:
        return close_open_runs(MlflowClient(tracking_uri), sweep.experiment, [parent], reason)
    except Exception as exc:  # the store is gone or full too: the next driver closes them
        log.warning("could not close the sweep's runs now (%s); its next driver will", _cause(exc))
        return []


def keep_line(sweep: SweepConfig, line: str) -> str | None:
    """The one line of an early end, kept beside the sweep's state too: after a closed terminal
    or a dropped SSH session (SIGHUP) it is the only copy of the `--resume` command. Where it
    lies, or None where the run storage cannot take it (a warning says why)."""
    try:  # written whole or not at all (RunStorage.write_text)
        storage = RunStorage.of(sweep.tune.storage_path, sweep.tune.storage_endpoint)
        storage.write_text(line + "\n", sweep.name, STOP_FILE)
    except Exception as exc:  # the storage is at fault too: the line must still come out
        log.warning("could not keep the sweep's last line beside its state (%s)", _cause(exc))
        return None
    return f"{storage}/{sweep.name}/{STOP_FILE}"


def resumable(sweep: SweepConfig, storage: RunStorage, parent: str) -> bool:
    """Whether `--resume` can continue the sweep: its sweep run began and its state file names
    it (a Tune state is not needed: without one the trials start anew under that run)."""
    if not parent:
        return False
    try:
        return storage.read_text(sweep.name, SWEEP_STATE_FILE) is not None
    except Exception as exc:  # the storage is gone too: the one line must still come out
        log.warning("could not read the sweep's saved state (%s)", _cause(exc))
        return False


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
