"""What a user watches while the trials run: Ray's trials named by their segtune labels, and a
progress table of the columns that matter in place of Ray's, whose config column read
`...', 'aspp': True}}` and whose boxes per trial made most of a quickstart's output.

Ray Tune's own reporter takes no columns under its current output engine (it shows the param
space and the first metrics a trial reports), so the driver silences it (`RunConfig(verbose=0)`:
it still prints the experiment's heading and every trial error) and reports with `Progress`.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

from ray import tune
from ray.tune.experiment import Trial

from segtune.config.names import OBJECTIVE, format_metric
from segtune.config.sweep import SweepConfig
from segtune.sweep.space import resolve_trial

EVERY_S = 30.0  # at most one table per half minute, as Ray's own heartbeat
MAX_ROWS = 20  # a larger sweep shows its first trials by status; the heading counts them all
FOLDER_LABEL_CHARS = 80  # a label's share of a trial folder's name
UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")  # what a folder name keeps, on a disk and on S3
STATUSES = (Trial.RUNNING, Trial.PAUSED, Trial.PENDING, Trial.ERROR, Trial.TERMINATED)
HEADER = ("trial", "status", "epoch", "val_miou", OBJECTIVE)


class TrialNames:
    """Ray's name and folder of a trial (`TuneConfig(trial_name_creator=...,
    trial_dirname_creator=...)`): its label (`SweepConfig.trial_label`), and for the folder the
    label made safe, then Ray's trial id, since two draws of a search can share a label. Ray
    saves both with the trial: a resumed sweep's trials keep the names they were given."""

    def __init__(self, sweep: SweepConfig) -> None:
        self.sweep = sweep

    def name(self, trial: Trial) -> str:
        return self.sweep.trial_label(resolve_trial(self.sweep, trial.config))

    def folder(self, trial: Trial) -> str:
        label = UNSAFE.sub("_", self.name(trial))[:FOLDER_LABEL_CHARS].strip("_")
        return f"{label}_{trial.trial_id}"


class Progress(tune.Callback):
    """The trials as a table on stdout, once something changed and at most every `every_s`:
    label, status, epoch, the last `val_miou` and the best so far (`best_val_miou`, which each
    epoch's result carries). The epoch is Ray's count of a trial's results, one per epoch and
    restored with its checkpoint, held at the trial's epochs for its final result."""

    def __init__(self, sweep: SweepConfig, every_s: float = EVERY_S) -> None:
        self.sweep, self.every_s = sweep, every_s
        self._epochs: dict[str, int] = {}  # by trial id
        self.setup()

    def setup(self, **info: Any) -> None:
        """At each start, a resumed sweep's too (Ray restores its callbacks pickled, and a
        monotonic clock of another process or machine compares with nothing)."""
        self._shown: list[tuple[str, ...]] = []
        self._shown_at = -float("inf")

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = time.monotonic()
        if now - self._shown_at < self.every_s:
            return
        rows = [self._row(t) for t in sorted(trials, key=lambda t: STATUSES.index(t.status))]
        if rows != self._shown:
            self._shown, self._shown_at = rows, now
            print(table(rows), flush=True)

    def _row(self, trial: Trial) -> tuple[str, ...]:
        if trial.trial_id not in self._epochs:
            self._epochs[trial.trial_id] = resolve_trial(self.sweep, trial.config).epochs
        epochs, result = self._epochs[trial.trial_id], trial.last_result
        done = min(int(result.get("training_iteration", 0)), epochs)
        return (
            str(trial),  # its label (TrialNames)
            trial.status,
            f"{done}/{epochs}",
            format_metric(result.get("val_miou"), "{:.3f}"),
            format_metric(result.get(OBJECTIVE), "{:.3f}"),
        )


def table(rows: list[tuple[str, ...]]) -> str:
    """The heading (the time, trials by status) and the rows: text left, numbers right."""
    counts = Counter(row[1] for row in rows)
    heading = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
    shown = [HEADER, *rows[:MAX_ROWS]]
    widths = [max(len(row[i]) for row in shown) for i in range(len(HEADER))]
    lines = [f"\n{time.strftime('%H:%M:%S')} trials: {heading}"]
    for row in shown:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in pairs]
        lines.append("  ".join(cells).rstrip())
    if len(rows) > MAX_ROWS:
        lines.append(f"... and {len(rows) - MAX_ROWS} more")
    return "\n".join(lines)
