"""Restore a sweep from what is on its run storage, not from what Tune last uploaded.

Tune uploads its experiment state (the trials) and its searcher's state in the background,
prunes checkpoints meanwhile and copies files in place, so a driver killed outright can leave
a state that names a checkpoint already pruned or copied in part, a searcher state older or
newer than the trials' state, or a file cut short. Before `Tuner.restore`, `prepare` reads what
is there through the run storage's pyarrow filesystem (S3 too) and repairs it: each unfinished
trial resumes from its newest complete checkpoint (`write_marker`), a grid or random searcher
is rebuilt from the trials' state, an Optuna one that disagrees is one line, and a damaged
`tuner.pkl` is put back from segtune's copy. docs/design.md, "A sweep's schedule".
"""

from __future__ import annotations

import fnmatch
import json
import logging
import pickle
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import cloudpickle
from ray.train import Checkpoint
from ray.train._internal.session import _TrainingResult
from ray.tune.result import TRAINING_ITERATION
from ray.tune.utils.serialization import TuneFunctionEncoder, _loads_with_cloudpickle

from segtune.errors import ConfigError
from segtune.sweep.budget import STATE_FILE as BUDGET_FILE
from segtune.sweep.storage import RunStorage

log = logging.getLogger(__name__)

MARKER_FILE = "segtune_checkpoint.json"  # written last into each checkpoint folder
TUNER_FILE, TUNER_COPY = "tuner.pkl", "segtune_tuner.pkl"
STATE_FILES = "experiment_state-*.json"  # Tune's names; the newest by name is the one read
GRID_FILES = "basic-variant-state-*.json"  # grid and random: BasicVariantGenerator
OPTUNA_FILES = ("search_gen_state-*.json", "searcher-state-*.pkl")
SET_ASIDE = ".segtune-damaged"  # neither .json nor .pkl: Tune neither reads nor downloads it
ENDED = ("TERMINATED", "ERROR")  # statuses a resumed sweep skips
DAMAGED = (EOFError, pickle.UnpicklingError, ValueError)  # a file cut short


def write_marker(folder: Path, iteration: int, metrics: dict[str, Any]) -> None:
    """Written last into a checkpoint's folder: its files and their sizes, so that a folder Ray
    copied only in part, in whatever order, is seen as incomplete, and the result it holds
    (with Ray's count of results), so that a trial resumes from it without Tune's word."""
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    marker = {"files": files, "iteration": iteration, "metrics": metrics}
    (folder / MARKER_FILE).write_text(json.dumps(marker))


def keep_tuner_copy(storage: RunStorage, path: str) -> None:
    """segtune's own copy of a new Tuner's `tuner.pkl` (Ray copies its own in place at every
    upload of a resumed sweep, where a killed driver can leave it cut short)."""
    experiment = _Experiment(storage, path, "")
    data = experiment.read(TUNER_FILE)
    if data is not None:
        experiment.write(TUNER_COPY, data)


def prepare(storage: RunStorage, path: str, sweep: str, grid: bool) -> bool:
    """Repair Ray's saved state of the experiment at `path` from what its storage holds; False
    when there is none to restore (its trials then start anew under the same sweep run).
    `grid`: a grid sweep, whose trials a rebuilt searcher makes again with the same ids."""
    experiment = _Experiment(storage, path, sweep)
    if not experiment.tuner_state():
        return False
    found = experiment.newest(STATE_FILES, json.loads)
    if found is None:
        log.info("sweep %s: Ray saved no state of its trials before its driver stopped; they "
                 "start anew under the same sweep run", sweep)  # fmt: skip
        return False
    name, state = found
    if not any(experiment.names(files) for files in (GRID_FILES, *OPTUNA_FILES)):
        return experiment.first_upload_cut(name, state)
    repaired = [experiment.repair_trial(pair) for pair in state["trial_data"]]
    if any(repaired):
        experiment.write(name, json.dumps(state).encode())
    trials = [json.loads(trial) for trial, _ in state["trial_data"]]
    budget = experiment.budget_state()
    variants = experiment.newest(GRID_FILES, cloudpickle.loads)
    if variants is not None:
        experiment.rebuild_variants(variants, trials, grid)
    else:
        experiment.check_optuna(trials, budget)
    return True


@dataclass
class _Experiment:
    """One experiment folder of a sweep on its run storage."""

    storage: RunStorage
    path: str  # in the filesystem's own terms
    sweep: str

    @property
    def fs(self) -> pafs.FileSystem:
        return self.storage.filesystem[0]

    def _parts(self, name: str) -> tuple[str, str]:
        return posixpath.relpath(self.path, self.storage.path()), name

    def read(self, name: str) -> bytes | None:
        return self.storage.read_bytes(*self._parts(name))

    def write(self, name: str, data: bytes) -> None:
        self.storage.write_bytes(data, *self._parts(name))

    def names(self, pattern: str) -> list[str]:
        """The files of the experiment's folder that match `pattern`, newest (by name) first."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(fnmatch.filter([i.base_name for i in infos], pattern), reverse=True)

    def newest(self, pattern: str, load: Callable[[bytes], Any]) -> tuple[str, Any] | None:
        """The newest file by name (as Tune picks it) that loads, and what it holds; newer ones
        cut short are set aside."""
        for name in self.names(pattern):
            try:
                return name, load(self.read(name) or b"")
            except DAMAGED as exc:
                target = posixpath.join(self.path, name)
                self.fs.move(target, target + SET_ASIDE)
                log.info("sweep %s: %s is damaged (%s: a driver killed while Ray copied it); "
                         "set aside, an older one is read", self.sweep, name, exc)  # fmt: skip
        return None

    def first_upload_cut(self, name: str, state: dict[str, Any]) -> bool:
        """A trials' state without a searcher's: Tune's first upload, cut short before its trials
        checkpointed (Ray would make the whole sweep again beside them). Set aside: they start
        anew."""
        trials = [json.loads(trial) for trial, _ in state["trial_data"]]
        if any(
            t["status"] in ENDED
            or self._checkpoints(posixpath.join(self.path, t["relative_logdir"]))
            for t in trials
        ):
            raise ConfigError(
                f"--resume: sweep {self.sweep}: Ray's saved state at {self.path} holds trials "
                "but no searcher state; run the sweep again without --resume"
            )
        target = posixpath.join(self.path, name)
        self.fs.move(target, target + SET_ASIDE)
        log.info("sweep %s: Ray's first saved state was cut short before its trials "
                 "checkpointed; they start anew under the same sweep run", self.sweep)  # fmt: skip
        return False

    def tuner_state(self) -> bool:
        """`tuner.pkl` whole (and segtune's copy of it kept), or put back from that copy; False
        when there is neither. A damaged one without a copy was cut short as the Tuner began
        (before any state of the trials: they start anew), else it is left to `Tuner.restore`."""
        data, copy = self.read(TUNER_FILE), self.read(TUNER_COPY)
        try:
            if data is not None:
                pickle.loads(data)
                if copy is None:
                    self.write(TUNER_COPY, data)
                return True
        except DAMAGED as exc:
            if copy is None:
                return bool(self.names(STATE_FILES))
            log.info("sweep %s: %s is damaged (%s: a driver killed while Ray copied it); put "
                     "back from segtune's copy", self.sweep, TUNER_FILE, exc)  # fmt: skip
        if copy is not None:
            self.write(TUNER_FILE, copy)
        return copy is not None

    def repair_trial(self, pair: list[str]) -> bool:
        """Point an unfinished trial of the saved state (`pair`: its state and run metadata, in
        Tune's JSON) at its newest complete checkpoint on storage, or at none (it starts
        anew); incomplete ones are deleted. Whether anything changed."""
        trial = json.loads(pair[0])
        if trial["status"] in ENDED:
            return False
        folder = posixpath.join(self.path, trial["relative_logdir"])
        found = self._checkpoints(folder)
        meta = _loads_with_cloudpickle(pair[1])
        manager = meta["checkpoint_manager"]
        named = manager.latest_checkpoint_result
        named_name = posixpath.basename(named.checkpoint.path) if named else None
        if named_name in found and self._unmarked(posixpath.join(folder, named_name)):
            # a sweep started before the marker: Ray copies a checkpoint whole before its
            # state can name it, so the named one is complete; Ray resumes from it as before
            return False
        for name in [n for n, marker in found.items() if marker is None]:
            self.fs.delete_dir(posixpath.join(folder, name))
            if name != named_name:
                log.info("trial %s: %s is incomplete (its copy was cut short); deleted",
                         trial["trial_id"], name)  # fmt: skip
        complete = sorted(n for n, marker in found.items() if marker is not None)
        storage = _decoded(trial["storage"])
        top = max((int(n.rsplit("_", 1)[1]) for n in found), default=-1)
        changed = top > storage.current_checkpoint_index  # new checkpoints in new folders
        if changed:
            storage.current_checkpoint_index = top
            trial["storage"] = TuneFunctionEncoder().default(storage)
        newest = complete[-1] if complete else None
        if newest != named_name:
            template = named.metrics if named else meta["last_result"]
            manager._checkpoint_results = [
                _TrainingResult(
                    Checkpoint(posixpath.join(folder, n), self.fs),
                    {
                        **template,
                        **found[n]["metrics"],
                        "checkpoint_dir_name": n,
                        TRAINING_ITERATION: found[n]["iteration"],
                    },
                )
                for n in complete
            ]
            manager._latest_checkpoint_result = (manager._checkpoint_results or [None])[-1]
            pair[1] = json.dumps(meta, indent=2, cls=TuneFunctionEncoder)
            if named_name is None:
                why = "Ray's state names no checkpoint"
            elif named_name not in found:
                why = f"{named_name} is gone"
            else:
                why = f"{named_name} is {'not the newest' if found[named_name] else 'incomplete'}"
            log.info("trial %s: %s; resuming from %s", trial["trial_id"], why,
                     newest or "the start")  # fmt: skip
            changed = True
        pair[0] = json.dumps(trial, indent=2)
        return changed

    def _unmarked(self, checkpoint: str) -> bool:
        """A checkpoint folder with no marker file at all (written before segtune wrote one)."""
        marker = posixpath.join(checkpoint, MARKER_FILE)
        return self.fs.get_file_info(marker).type == pafs.FileType.NotFound

    def _checkpoints(self, folder: str) -> dict[str, dict[str, Any] | None]:
        """A trial's checkpoint folders on storage, each with its marker, or None where the
        folder does not match its marker (or has none)."""
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=True)
        sizes: dict[str, dict[str, int]] = {}
        for info in self.fs.get_file_info(selector):
            top, _, rest = posixpath.relpath(info.path, folder).partition("/")
            if top.startswith("checkpoint_"):
                files = sizes.setdefault(top, {})
                if rest and info.type == pafs.FileType.File:
                    files[rest] = info.size
        found: dict[str, dict[str, Any] | None] = {}
        for name, files in sizes.items():
            found[name] = None
            if MARKER_FILE in files:
                with self.fs.open_input_stream(posixpath.join(folder, name, MARKER_FILE)) as f:
                    try:
                        marker = json.loads(f.read())
                    except ValueError:
                        continue
                if all(files.get(n) == size for n, size in marker["files"].items()):
                    found[name] = marker
        return found

    def rebuild_variants(
        self, saved: tuple[str, dict[str, Any]], trials: list[dict[str, Any]], grid: bool
    ) -> None:
        """Make the grid or random searcher's saved state agree with the trials' state: the
        trials it made (rewound or advanced to the trials' count) and those it counts live."""
        name, state = saved
        (iterator,) = state["_iterators"]  # one experiment per Tuner
        ids = [t["trial_id"] for t in trials]
        unfinished = {t["trial_id"] for t in trials if t["status"] not in ENDED}
        made = max((int(i.rsplit("_", 1)[1]) + 1 for i in ids), default=0)
        live = state["_live_trials"]
        if iterator.counter == made and live == unfinished:
            return
        what = (f"searcher: {iterator.counter} trial(s) made, {len(live)} running; trials' "
                f"state: {made} made, {len(unfinished)} unfinished")  # fmt: skip
        if iterator.counter != made:
            counter = iterator.counter
            _rewind(iterator, len(ids))
            if not grid:  # a sampled trial drawn again is another trial: never a former id
                iterator.counter = max(counter, made)
            state["_finished"] = False
        state["_live_trials"] = unfinished
        self.write(name, cloudpickle.dumps(state))
        log.info("sweep %s: the saved searcher state disagrees with the trials' state (%s); "
                 "rebuilt from the trials' state", self.sweep, what)  # fmt: skip

    def budget_state(self) -> dict[str, Any] | None:
        """The budget's saved state (segtune.sweep.budget), where the sweep has a budget. It is
        one file with no older copy: a damaged one is one line, never set aside (the budget
        would start again from nothing, and a reached one train again)."""
        data = self.read(BUDGET_FILE)
        if data is None:
            return None
        try:
            state: dict[str, Any] = json.loads(data)
        except ValueError as exc:
            raise ConfigError(
                f"--resume: sweep {self.sweep}: the budget's saved state {BUDGET_FILE} is "
                f"damaged ({exc}: a driver killed while Ray copied it); run the sweep again "
                "without --resume"
            ) from None
        return state

    def check_optuna(self, trials: list[dict[str, Any]], budget: dict[str, Any] | None) -> None:
        """An Optuna searcher whose saved state disagrees with the trials' state is one line:
        its study cannot be rebuilt from them. A trial the budget refused (`Budget.refused`)
        is the study's and never Tune's: it does not count."""
        generator = self.newest(OPTUNA_FILES[0], cloudpickle.loads)
        searcher = self.newest(OPTUNA_FILES[1], pickle.loads)
        if generator is None or searcher is None:
            return
        ids = {t["trial_id"] for t in trials}
        ended = {t["trial_id"] for t in trials if t["status"] in ENDED}
        known, completed = set(searcher[1]["_ot_trials"]), searcher[1]["_completed_trials"]
        refused = known & {budget["refused"]} - ids if budget else set()
        known, counter = known - refused, generator[1]["counter"] - len(refused)
        limiter = generator[1].get("name:ConcurrencyLimiter", {})
        live = limiter.get("live_trials", ids - ended)
        if (known, completed, live, counter) == (ids, ended, ids - ended, len(ids)):
            return
        raise ConfigError(
            f"--resume: sweep {self.sweep}: Tune saved the Optuna searcher's state and the "
            f"trials' state at different moments (searcher: {len(known)} trial(s), "
            f"{len(completed)} ended, {len(live)} running; trials' state: {len(ids)}, "
            f"{len(ended)} ended); an Optuna study cannot be rebuilt from its trials: run the "
            "sweep again without --resume"
        )


def _decoded(value: Any) -> Any:
    """An object Tune's JSON holds pickled (`TuneFunctionEncoder`)."""
    return _loads_with_cloudpickle(json.dumps(value))


def _rewind(iterator: Any, count: int) -> None:
    """Set Tune's trial iterator (`_TrialIterator`) to the point where it has made `count`
    trials: from its start, through its own `__next__`, with trials counted, not built (a
    Trial needs the trainable registered)."""
    iterator.counter, iterator.num_samples_left, iterator.variants = 0, iterator.num_samples, None
    iterator.create_trial = lambda *_: setattr(iterator, "counter", iterator.counter + 1)
    try:
        for _ in range(count):
            next(iterator)
    finally:
        del iterator.create_trial
