"""Ctrl-C and SIGTERM during a sweep.

While Ray Tune runs the trials, the first signal asks for Tune's graceful stop (its SIGUSR1
handler: the trials stop and the experiment state is saved, so `--resume` continues); at any
other moment, or at a second signal, the sweep stops at once with `SweepInterrupted`. Either way
the driver then closes its MLflow runs as KILLED and exits with 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM), as shells and CI expect of an interrupted command.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any

from segtune.errors import SegtuneError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
TUNE_STOP = signal.SIGUSR1  # Ray Tune's graceful stop (tune.run installs its handler)


class SweepInterrupted(SegtuneError):
    """The sweep stopped on a signal; the exit status is 128 + its number. `resumable`: Tune
    saved a state that `--resume` can continue."""

    def __init__(self, signum: int, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.signum, self.resumable = signum, resumable
        self.exit_code = 128 + signum


class StopSignals:
    """`with StopSignals() as stop:` routes SIGINT and SIGTERM; `with stop.graceful():` marks the
    stretch in which Tune can stop gracefully; `stop.received` is the first signal, if any."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._graceful = False
        self._previous: dict[int, Any] = {}
        self._tune_env: str | None = None

    def __enter__(self) -> StopSignals:
        # Tune's own SIGINT handler would hide SIGINT from us and ignore SIGTERM
        self._tune_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self._previous = {signum: signal.getsignal(signum) for signum in (*SIGNALS, TUNE_STOP)}
        # a handler an earlier Tune run left must not take our first signal: Tune installs its
        # own when it starts
        signal.signal(TUNE_STOP, signal.SIG_DFL)
        self.install()
        return self

    def install(self) -> None:
        """Route the signals here (again after `ray.init`, which sets its own SIGTERM handler)."""
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            if self._graceful and callable(signal.getsignal(TUNE_STOP)):
                log.warning(
                    "%s: stopping the trials and saving the sweep's state; send it again to "
                    "stop at once",
                    name,
                )
                signal.raise_signal(TUNE_STOP)
                return
        raise SweepInterrupted(self.received, f"interrupted by {name}")

    @contextmanager
    def graceful(self) -> Iterator[None]:
        self._graceful = True
        try:
            yield
        finally:
            self._graceful = False

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._tune_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._tune_env
