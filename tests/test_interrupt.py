"""A signal is never lost: Python runs a handler between any two bytecodes of the main thread,
also inside a finalizer, where the handler's exception is printed and dropped (a SIGTERM
while Ray started once left a driver running for a minute after it). Real signals, sent to
this process while `StopSignals` holds them."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import pytest

from segtune.sweep.signals import StopSignals, SweepInterrupted


class SignalsWhenDropped:
    """An object whose finalizer receives a signal, as importlib's module-lock callback did."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        signal.raise_signal(self.signum)  # the handler runs here, inside the finalizer


def go_on() -> None:
    """Bytecodes after the finalizer, where the signal sent again lands (in a second at most)."""
    end = time.monotonic() + 1
    while time.monotonic() < end:
        pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_that_lands_in_a_finalizer_still_stops(signum: int) -> None:
    with StopSignals() as stop, pytest.raises(SweepInterrupted) as raised:
        SignalsWhenDropped(signum)
        go_on()
    assert raised.value.exit_code == 128 + signum and stop.received == signum


def test_rays_sigterm_exit_that_lands_in_a_finalizer_is_the_sweeps() -> None:
    """ray.init sets `sys.exit(15)` as SIGTERM's handler while it starts."""
    with StopSignals() as stop, pytest.raises(SweepInterrupted) as raised, stop.starting_ray():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        SignalsWhenDropped(signal.SIGTERM)
        go_on()
    assert raised.value.exit_code == 143 and stop.received == signal.SIGTERM


def test_other_errors_in_finalizers_are_reported_as_before() -> None:
    seen: list[Any] = []
    before, sys.unraisablehook = sys.unraisablehook, seen.append
    try:

        class Broken:
            def __del__(self) -> None:
                raise ValueError("in a finalizer")

        with StopSignals():
            Broken()
            go_on()
        assert sys.unraisablehook == seen.append  # given back
    finally:
        sys.unraisablehook = before
    assert [type(u.exc_value) for u in seen] == [ValueError]


def test_a_stop_caught_inside_rays_start_still_stops() -> None:
    """Some of Ray's waits catch every exception, our handler's too: the signal stops the
    sweep once Ray has started."""
    with StopSignals() as stop, pytest.raises(SweepInterrupted) as raised, stop.starting_ray():
        try:
            signal.raise_signal(signal.SIGINT)
            go_on()
        except SweepInterrupted:
            pass  # as Ray's wait for its GCS does
    assert raised.value.exit_code == 130 and stop.received == signal.SIGINT


def test_a_hangup_while_ray_starts_waits_for_its_end() -> None:
    """SIGHUP is blocked in the thread that starts Ray (its processes inherit that); one sent to
    that thread meanwhile stops the sweep as soon as Ray has started."""
    with StopSignals() as stop, pytest.raises(SweepInterrupted) as raised, stop.starting_ray():
        signal.raise_signal(signal.SIGHUP)  # held: this thread blocks it
        go_on()
        assert stop.received is None
        assert signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert raised.value.exit_code == 129 and stop.received == signal.SIGHUP
    assert signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_signal_ignored_at_start_stays_ignored() -> None:
    """Under `nohup` SIGHUP is ignored: the sweep does not take it back."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            signal.raise_signal(signal.SIGHUP)
            go_on()
        assert stop.received is None
    finally:
        signal.signal(signal.SIGHUP, before)
