"""A sweep that cannot go on says so: when no trial has run for a while and the trials' states
have not changed, while Tune's loop goes on (it ends by itself once every trial ended and the
searcher has none left), the driver stops the trials the way a lost tracking server does
(`StopSignals.give_up`: Tune saves its state; at once where Tune waits inside a step, below),
closes its runs and ends in one line naming the trials, their states and why none can start;
never a silent wait.

Two causes are known: trials PENDING that Ray cannot place (another job holds the resources,
or a node is gone with no other that fits), and a searcher that hands out nothing though the
sweep is not finished (a grid whose saved state counts an ended trial as live, with
`max_concurrent_trials: 1`). Waiting that leads somewhere does not trip it: a trial RUNNING
for hours, trials PENDING while Ray starts their actors, a trial that lost its node and waits
while the others run (each changes the trials' states, or has one RUNNING).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial

from segtune.errors import ConfigError
from segtune.sweep.progress import STATUSES

log = logging.getLogger(__name__)

STALL_ENV = "SEGTUNE_STALL_S"  # the window, in seconds; tests shorten it
STALL_S = 60.0
NAMED = 8  # trials named in the line; the rest are counted by state
PROBE_S = 1.0  # how often the watching thread looks
GRACE_S = 10.0  # after the graceful stop was asked: how long a step may still last
WAITING = (Trial.PENDING, Trial.PAUSED)  # trials Tune would start if Ray placed them


def stall_window() -> float:
    """Seconds without a running trial or a change of state before the sweep is stopped."""
    text = os.environ.get(STALL_ENV, "")
    if not text:
        return STALL_S
    try:
        window = float(text)
    except ValueError:
        window = 0.0
    if not 0 < window < float("inf"):
        raise ConfigError(f"{STALL_ENV}={text}: a number of seconds above 0, e.g. 60")
    return window


class StallWatch(tune.Callback):
    """What Tune's loop shows at each step (it steps about every 0.1 s while it waits for
    trials): the trials, since when none has been RUNNING with the same states, and since when
    the loop is inside its current step."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.setup()

    def setup(self, **info: Any) -> None:
        """At each start, a resumed sweep's too (its trials are new objects)."""
        self._trials: list[Trial] = []
        self._states: tuple[tuple[str, str], ...] | None = None
        self._since = time.monotonic()
        self._step_began: float | None = None

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self._step_began = time.monotonic()
        self._saw(trials)  # a step may not end: Tune waits inside it for a searcher's trial

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self._step_began = None
        self._saw(trials)

    def _saw(self, trials: list[Trial]) -> None:
        states = tuple((t.trial_id, t.status) for t in trials)
        if states != self._states or any(t.status == Trial.RUNNING for t in trials):
            self._states, self._since = states, time.monotonic()
        self._trials = list(trials)

    def stalled(self, now: float) -> str | None:
        """The line to stop with once the loop has begun and nothing has run or changed for
        `window_s`, else None."""
        if self._states is None or now - self._since < self.window_s:
            return None
        return stall_line(self._trials, self.window_s)

    def in_step_since(self, moment: float) -> bool:
        """Whether the loop is still inside a step that began by `moment`."""
        began = self._step_began
        return began is not None and began <= moment


def stall_line(trials: Sequence[Trial], window_s: float) -> str:
    """What stalled, in one line: the trials by state (the waiting ones first) and why."""
    ordered = sorted(trials, key=lambda t: STATUSES.index(t.status))
    named = ", ".join(f"{t} ({t.status})" for t in ordered[:NAMED])
    rest = Counter(t.status for t in ordered[NAMED:])
    if rest:
        named += " and " + ", ".join(f"{n} more {status}" for status, n in rest.items())
    return f"no trial could start for {window_s:g} s: {named or 'no trials'}; {_why(trials)}"


def _why(trials: Sequence[Trial]) -> str:
    """Ray does not start the waiting trials (what one asks, what the cluster has free), or,
    none waiting, the searcher hands out none."""
    waiting = [t for t in trials if t.status in WAITING]
    if not waiting:
        return (
            "the searcher hands out no further trial though the sweep is not finished (its "
            "saved state may count an ended trial as live)"
        )
    asked = {k: v for k, v in waiting[0].placement_group_factory.required_resources.items() if v}
    free, total = ray.available_resources(), ray.cluster_resources()
    wants = ", ".join(f"{k} {v:g}" for k, v in asked.items())
    has = ", ".join(f"{k} {free.get(k, 0):g} of {total.get(k, 0):g}" for k in asked)
    return (
        f"Ray started none of the waiting trials: each asks {wants}, the cluster has {has} free "
        "(another job holds the rest, a node is gone, or their processes do not start); free them "
        "or add nodes"
    )


@contextmanager
def watch_stalls(
    tuner: tune.Tuner, on_stall: Callable[[str], bool], stop_now: Callable[[], None]
) -> Iterator[None]:
    """While the block runs `tuner.fit()`: once no trial has run or changed state for the
    window, call `on_stall(line)` (from a watching thread) until it returns True, that it
    asked Tune for its graceful stop. Tune takes that stop at the end of its current step, but
    with every trial ended it waits for the searcher's next trial inside one step, up to 600 s
    (`TuneController._update_trial_queue`), before it looks: a step that began before the stop
    was asked and has not ended GRACE_S later is ended by `stop_now()` (the state Tune saved
    last, nothing having run since).

    The watch is a callback of `tuner`, a restored Tuner's too: `Tuner.restore` takes the run
    config, callbacks included, from the tuner.pkl that the sweep's first driver wrote, so a
    sweep started before the watch existed would resume without it. Ray 2.60 offers no public
    way to give a restored Tuner a callback; its TunerInternal's run config is reached through
    the private `Tuner._local_tuner` (None with Ray Client, `--address ray://...`, whose
    TunerInternal lives in the cluster). Added after the Tuner wrote tuner.pkl, the watch is
    never pickled: every driver, the first or a resumed one, adds its own."""
    internal = tuner._local_tuner
    if internal is None:
        log.warning("through Ray Client a sweep that cannot go on is not stopped: watch it")
        yield
        return
    watch = StallWatch(stall_window())
    config = internal.get_run_config()
    config.callbacks = [*(config.callbacks or []), watch]
    done, ending = threading.Event(), threading.Lock()

    def run() -> None:
        asked: float | None = None
        while not done.wait(min(PROBE_S, watch.window_s / 4)):
            now = time.monotonic()
            if asked is None:
                line = watch.stalled(now)
                asked = now if line is not None and on_stall(line) else None
                continue
            with ending:  # never once the block has ended
                if now - asked >= GRACE_S and watch.in_step_since(asked) and not done.is_set():
                    log.debug("Tune waits inside a step for a trial: stopping at once")
                    stop_now()
                    return

    thread = threading.Thread(target=run, name="segtune-stall-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with ending:
            done.set()
        thread.join(timeout=PROBE_S * 3)
