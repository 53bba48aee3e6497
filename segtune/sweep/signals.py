"""Ctrl-C, SIGTERM, a closed terminal or dropped SSH session (SIGHUP) and Ctrl-\\ (SIGQUIT)
during a sweep, and the other reason to stop it early: the tracking server gone for longer than
the sweep allows (segtune.tracking.outage).

While Ray Tune runs the trials, the first signal asks for Tune's graceful stop (its SIGUSR1
handler: the trials stop and the experiment state is saved, so `--resume` continues); at any
other moment, or at a second signal, the sweep stops at once with `SweepInterrupted`. Either way
the driver then closes its MLflow runs as KILLED and exits with 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP, 131 for SIGQUIT), as shells and CI expect of
an interrupted command. A lost server stops the trials the same graceful way; the driver then
leaves its runs to the next one and exits 1. So does a sweep in which no trial can start
(segtune.sweep.stall), whose runs the driver closes, since its store answers.

A terminal sends SIGHUP and SIGQUIT to its whole foreground process group, Ray's GCS and raylet
included: those would die at once and take the trials with them, before the driver could stop
them and save Tune's state. Ray's processes are started with both blocked (as Ray itself does
for SIGINT), so the driver alone takes them and stops Ray in order. A signal the driver was
started ignoring (`nohup` ignores SIGHUP) stays ignored, by Ray's processes too.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any

from segtune.errors import SegtuneError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
GROUP_ONLY = {signal.SIGHUP, signal.SIGQUIT}  # a terminal's, to the group: not for Ray's processes
TUNE_STOP = signal.SIGUSR1  # Ray Tune's graceful stop (tune.run installs its handler)
RESEND_S = 0.05  # a signal a finalizer swallowed is sent again after this, outside it


class SweepInterrupted(SegtuneError):
    """The sweep stopped before its end: exit status 128 + the signal's number, or 1 for a lost
    tracking server. `resumable`: its sweep run began, so `--resume` can continue it."""

    def __init__(self, message: str, exit_code: int, resumable: bool = False) -> None:
        super().__init__(message)
        self.exit_code, self.resumable = exit_code, resumable


class StopSignals:
    """`with StopSignals() as stop:` routes SIGNALS; `with stop.graceful():` marks the
    stretch in which Tune can stop gracefully; `stop.received` is the first signal, if any, and
    `stop.lost` why the driver gave the sweep up (`stop.give_up`), and `stop.close_runs` whether
    its store still takes the runs' end."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.lost: str | None = None
        self.close_runs = False
        self._graceful = False
        self._at_once = False
        self._previous: dict[int, Any] = {}
        self._routed: tuple[int, ...] = ()
        self._tune_env: str | None = None
        self._unraisable_hook: Any = None

    def __enter__(self) -> StopSignals:
        # Tune's own SIGINT handler would hide SIGINT from us and ignore SIGTERM
        self._tune_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self._previous = {signum: signal.getsignal(signum) for signum in (*SIGNALS, TUNE_STOP)}
        # what the driver was started ignoring stays ignored: `nohup` means it
        self._routed = tuple(s for s in SIGNALS if self._previous[s] is not signal.SIG_IGN)
        # a handler an earlier Tune run left must not take our first signal: Tune installs its
        # own when it starts
        signal.signal(TUNE_STOP, signal.SIG_DFL)
        self._unraisable_hook, sys.unraisablehook = sys.unraisablehook, self._swallowed
        self.install()
        return self

    @property
    def stopped(self) -> bool:
        return self.received is not None or self.lost is not None

    def install(self) -> None:
        """Route the signals here."""
        for signum in self._routed:
            signal.signal(signum, self._handle)

    @contextmanager
    def starting_ray(self) -> Iterator[None]:
        """Around `ray.init`, which sets its own SIGTERM handler (`sys.exit(15)`): a SIGTERM that
        lands there is taken as ours, and ours is back once Ray has started. Ray's processes,
        started from this thread, inherit GROUP_ONLY blocked; a signal of them sent meanwhile
        reaches the driver through its other threads, or once this ends."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_ONLY)
        try:
            yield
            self.check()  # Ray's start may have caught our handler's exception
        except SystemExit as exc:
            if exc.code != signal.SIGTERM:
                raise
            self.received = self.received or signal.SIGTERM
            raise SweepInterrupted("interrupted by SIGTERM", 128 + signal.SIGTERM) from None
        finally:
            self.install()
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # one held meanwhile lands now

    def _swallowed(self, unraisable: Any) -> None:
        """A handler runs between any two bytecodes of the main thread, also inside a finalizer
        or a weakref callback (importlib drops its module locks in one), where Python prints
        the handler's exception and goes on: the signal would be lost. It is sent again from
        another thread, a moment later (sent from here, it would run its handler here)."""
        exc = unraisable.exc_value
        if isinstance(exc, SweepInterrupted) and exc.exit_code > 128:
            signum = exc.exit_code - 128
        elif isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:  # Ray's handler
            signum = signal.SIGTERM
        else:
            self._unraisable_hook(unraisable)
            return
        log.debug("%s landed in a finalizer; sent again", signal.Signals(signum).name)
        threading.Timer(RESEND_S, os.kill, (os.getpid(), signum)).start()

    def give_up(self, reason: str, close_runs: bool = False) -> bool:
        """From any thread: stop the trials as a first signal would (Tune saves its state),
        because of `reason`; False, and nothing done, before Tune can stop gracefully.
        `close_runs`: the store answers (not a lost server), so the driver closes its runs as
        it ends."""
        if not (self._graceful and callable(signal.getsignal(TUNE_STOP))):
            return False
        self.lost, self.close_runs = reason, close_runs
        log.warning("%s: stopping the trials and saving the sweep's state", reason)
        os.kill(os.getpid(), TUNE_STOP)
        return True

    def stop_now(self) -> None:
        """From another thread, after `give_up`: stop at once, as a second signal does, where
        Tune's loop would take the graceful stop too late (`segtune.sweep.stall`). The main
        thread raises SweepInterrupted through the handler of a signal routed here, at its next
        bytecode; Python only simulates that signal (`_thread.interrupt_main`)."""
        if self._routed:
            self._at_once = True
            _thread.interrupt_main(self._routed[0])

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._at_once:  # stop_now's, not a signal from outside
            raise SweepInterrupted(f"stopped at once: {self.lost}", 1)
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
        raise SweepInterrupted(f"interrupted by {name}", 128 + self.received)

    def check(self) -> None:
        """Stop now if a signal came and its handler's exception was caught on the way (Ray
        catches every exception in some of its waits): the signal must not be lost."""
        if self.received is not None:
            name = signal.Signals(self.received).name
            raise SweepInterrupted(f"interrupted by {name}", 128 + self.received)

    @contextmanager
    def graceful(self) -> Iterator[None]:
        self.check()  # a signal since the last check stops the sweep before its trials
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
        sys.unraisablehook = self._unraisable_hook
        if self._tune_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._tune_env
