"""A sweep that cannot go on says so: when no trial has run for a while and the trials' states
have not changed, while Tune's loop goes on (it ends by itself once every trial ended and the
searcher has none left), the driver stops the trials the way a lost tracking server does
(`StopSignals.give_up`: Tune saves its state), closes its runs and ends in one line naming the
trials, their states and why none can start; never a silent wait.

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
import time
from collections import Counter
from collections.abc import Callable, Sequence
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
    """Calls `on_stall(line)` once no trial has been RUNNING and no trial changed state for
    `window_s` seconds of Tune's loop (`on_step_end` runs about every 0.1 s while the loop
    waits), again at each step until it returns True (that the sweep is being stopped)."""

    def __init__(self, on_stall: Callable[[str], bool], window_s: float) -> None:
        self.on_stall, self.window_s = on_stall, window_s
        self.setup()

    def setup(self, **info: Any) -> None:
        self._states: tuple[tuple[str, str], ...] | None = None
        self._since = time.monotonic()
        self._stopping = False

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = time.monotonic()
        states = tuple((t.trial_id, t.status) for t in trials)
        if states != self._states or any(t.status == Trial.RUNNING for t in trials):
            self._states, self._since = states, now
            return
        if not self._stopping and now - self._since >= self.window_s:
            self._stopping = self.on_stall(stall_line(trials, self.window_s))


def stall_line(trials: Sequence[Trial], window_s: float) -> str:
    """What stalled, in one line: the trials by state (the waiting ones first) and why."""
    ordered = sorted(trials, key=lambda t: STATUSES.index(t.status))
    named = ", ".join(f"{t} ({t.status})" for t in ordered[:NAMED])
    rest = Counter(t.status for t in ordered[NAMED:])
    if rest:
        named += " and " + ", ".join(f"{n} more {status}" for status, n in rest.items())
    return f"no trial could start for {window_s:g} s: {named or 'no trials'}; {_why(trials)}"


def _why(trials: Sequence[Trial]) -> str:
    """Ray cannot place the waiting trials (what one asks, what the cluster has free), or,
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
        f"Ray cannot place the {len(waiting)} waiting: each asks {wants}, the cluster has {has} "
        "free (another job holds the rest, or a node is gone); free them or add nodes"
    )


def watch_stalls(tuner: tune.Tuner, on_stall: Callable[[str], bool]) -> None:
    """Add a StallWatch to `tuner`'s callbacks, a restored Tuner's too: `Tuner.restore` takes
    the run config, callbacks included, from the tuner.pkl the sweep's first driver wrote, so a
    sweep started before the watch existed would resume without it. Ray 2.60 offers no public
    way to give a restored Tuner a callback; its TunerInternal's run config is reached through
    the private `Tuner._local_tuner` (None with Ray Client, `--address ray://...`, whose
    TunerInternal lives in the cluster). Added after the Tuner wrote tuner.pkl, the watch is
    never pickled: every driver, the first or a resumed one, adds its own."""
    internal = tuner._local_tuner
    if internal is None:
        log.warning("through Ray Client a sweep that cannot go on is not stopped: watch it")
        return
    config = internal.get_run_config()
    config.callbacks = [*(config.callbacks or []), StallWatch(on_stall, stall_window())]
