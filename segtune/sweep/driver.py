"""The sweep on Ray Tune: every node checked, parent MLflow run, Tuner (search, scheduler,
retries, checkpoints on the run storage), and a driver-side callback that closes the MLflow
runs of trials Ray stopped or lost.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import posixpath
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune

from segtune.config.names import DATASET_TAG, FLOOR_METRIC, STOPPED_TAG
from segtune.config.sweep import SweepConfig, search_form
from segtune.config.trial import TrialConfig, parse_hw
from segtune.data.dataset import fingerprint
from segtune.data.pipeline import Scan, ensure_dataset
from segtune.errors import ConfigError, SegtuneError
from segtune.models import MODEL_KEYS
from segtune.models.cost import Cost
from segtune.sweep.budget import with_budget
from segtune.sweep.callbacks import CloseRuns, answer_to_former_name
from segtune.sweep.cost_stage import model_key, run_cost_stage
from segtune.sweep.edits import (
    SWEEP_COPY_FILE,
    SWEEP_STATE_FILE,
    Addition,
    Edits,
    additions,
    commit,
    read_state,
)
from segtune.sweep.ending import end_failed, end_stopped, now
from segtune.sweep.feasible import Feasibility, exclude
from segtune.sweep.lock import SweepLock
from segtune.sweep.node_checks import check_nodes, node_name
from segtune.sweep.preflight import needed_weights
from segtune.sweep.progress import Progress, TrialNames
from segtune.sweep.restore import keep_tuner_copy, prepare
from segtune.sweep.search import searcher, trial_scheduler
from segtune.sweep.signals import StopSignals
from segtune.sweep.space import GRID_KEY, discrete_trials, kept, param_space
from segtune.sweep.stall import watch_stalls
from segtune.sweep.storage import RunStorage
from segtune.sweep.trainable import run_trial
from segtune.sweep.warm import Earlier, Told, earlier_trials, warm_space
from segtune.tracking.address import create_store_whole, public_uri
from segtune.tracking.outage import watch_server
from segtune.tracking.runs import close_open_runs, start_sweep_run

log = logging.getLogger(__name__)


def check_cluster(sweep: SweepConfig) -> None:
    """Resources a trial asks for must exist now: pending forever is not an answer."""
    available = ray.cluster_resources()
    wanted = sweep.tune.resources_per_trial
    for key, amount in (("CPU", wanted.cpu), ("GPU", wanted.gpu)):
        if amount > available.get(key, 0):
            raise ConfigError(
                f"tune.resources_per_trial.{key.lower()}: {amount} asked, but the cluster has "
                f"{available.get(key, 0):g} {key}; lower it or add nodes"
            )


def _parent_run(
    sweep: SweepConfig,
    storage: RunStorage,
    tracking_uri: str,
    sweep_yaml: str,
    resume: bool,
    outcome: SweepOutcome,
) -> str:
    """The sweep's parent run: a new one, or on --resume the one named in the sweep's state
    file, which lives beside Ray's experiment state so that any machine can resume. It is in
    `outcome` from its creation on, so that a fault that follows (its artifact not written)
    closes it."""
    state = read_state(storage, sweep.name) if resume else {}
    if state:
        parent = outcome.parent = state["parent_run_id"]
        client = MlflowClient(tracking_uri)
        client.update_run(parent, status="RUNNING")
        if STOPPED_TAG in client.get_run(parent).data.tags:  # it goes on: no longer stopped
            client.delete_tag(parent, STOPPED_TAG)
        return parent
    parent = start_sweep_run(
        MlflowClient(tracking_uri),
        sweep.experiment,
        sweep.name,
        sweep_yaml,
        sweep.description,
        node=node_name(),
        created=lambda run_id: setattr(outcome, "parent", run_id),
    )
    # the store's address for whoever reads the storage: no password (--resume takes its own)
    state = json.dumps({"parent_run_id": parent, "tracking_uri": public_uri(tracking_uri)})
    storage.write_text(sweep_yaml, sweep.name, SWEEP_COPY_FILE)  # what --resume compares with
    storage.write_text(state, sweep.name, SWEEP_STATE_FILE)
    return parent


def _cost_stage_configs(sweep: SweepConfig) -> list[TrialConfig]:
    """The networks a sweep's trials can build, when they can be known before it starts: every
    one of a grid, or of the discrete choices of a sampled space. None when a model key is
    sampled from a range (each trial then times its own network)."""
    sampled = {key for key, spec in sweep.search_space.items()
               if search_form(spec)[0] in ("uniform", "loguniform", "randint")}  # fmt: skip
    if sampled & set(MODEL_KEYS):
        return []
    return discrete_trials(sweep)


def _duration(
    sweep: SweepConfig, costs: dict[tuple[Any, ...], Cost]
) -> Callable[[TrialConfig], float]:
    """An estimate of a trial's training time for ordering: its network's measured latency
    (GPU on GPU trials), scaled from the benchmark input to the crop, times the epochs."""
    on_gpu = sweep.tune.resources_per_trial.gpu > 0
    height, width = parse_hw(sweep.bench.input)

    def estimate(cfg: TrialConfig) -> float:
        cost = costs.get(model_key(cfg), {})
        ms = (cost.get("infer_ms_gpu") if on_gpu else None) or cost.get("infer_ms_cpu", 0.0)
        return ms * cfg.image_size**2 / (height * width) * cfg.epochs

    return estimate


def _slots(sweep: SweepConfig, trials: int) -> int:
    """How many trials can run at once: the concurrency limit, the cluster's resources and the
    number of trials, whichever is least."""
    wanted, available = sweep.tune.resources_per_trial, ray.cluster_resources()
    limits = [trials, sweep.tune.max_concurrent_trials or trials]
    limits.append(math.floor(available.get("CPU", 0) / wanted.cpu) if wanted.cpu else trials)
    if wanted.gpu:
        limits.append(math.floor(available.get("GPU", 0) / wanted.gpu))
    return max(1, min(limits))


def _tuner(
    sweep: SweepConfig,
    storage: RunStorage,
    tracking_uri: str,
    parent: str,
    trainable: Any,
    costs: dict[tuple[Any, ...], Cost],
    path: str,
    resume: bool,
    added: Addition | None,
    slots: int,
    earlier: Sequence[Earlier] = (),
) -> tune.Tuner:
    """The Tuner of one of the sweep's experiments at `path`: the sweep's own (restored on
    --resume; `earlier` warm-starts it), or the trials `--accept-changes` added."""
    filesystem, _ = storage.filesystem
    remote = None if storage.is_local else filesystem
    restoring = resume or added is not None
    if restoring:
        answer_to_former_name()
    # from what the storage holds, repaired (segtune.sweep.restore); none: the trials start anew
    if restoring and prepare(storage, path, sweep.name, grid=sweep.tune.search == "grid"):
        try:
            return tune.Tuner.restore(
                path, trainable, resume_unfinished=True, storage_filesystem=remote
            )
        except (EOFError, pickle.UnpicklingError) as exc:  # Ray writes it in place
            raise ConfigError(
                f"--resume: Ray's saved state of sweep {sweep.name} is damaged ({exc}: a "
                "driver killed while Tune wrote it); run the sweep again without --resume"
            ) from None
    run_config = tune.RunConfig(
        name=posixpath.basename(path),
        storage_path=posixpath.dirname(path),
        storage_filesystem=remote,
        failure_config=tune.FailureConfig(max_failures=sweep.tune.max_failures),
        # the two latest: Tune uploads its state (naming a trial's latest checkpoint) every
        # num_to_keep checkpoints, so the one it names stays until a newer state replaces it;
        # ranking by a metric would delete it at any epoch. The best weights travel inside our
        # own checkpoint (sweep/trainable.py), not through Ray's ranking.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[CloseRuns(tracking_uri, sweep.experiment, parent), Progress(sweep)],
        # Ray's reporter shows the param space and result boxes; ours shows the labels
        # (segtune.sweep.progress), Ray's comes back with -v (debug logging)
        verbose=1 if log.isEnabledFor(logging.DEBUG) else 0,
    )
    told: list[Told] = []
    constraints = sweep.tune.constraint_list()  # a grid's or a random sweep's (`exclude`)
    keep = Feasibility(constraints, costs).keep if constraints else None
    if added is None:
        space, samples = param_space(sweep, _duration(sweep, costs), keep), sweep.tune.num_samples
        space, told = warm_space(sweep, space, earlier, MlflowClient(tracking_uri), parent)
    elif added.trials is not None:  # a grid's new combinations, each once, those it keeps
        space, samples = {GRID_KEY: tune.grid_search(kept(sweep, added.trials, keep))}, 1
    else:  # more draws from the same space, among what it keeps
        space, samples = param_space(sweep, keep=keep), added.samples
    objectives = sweep.objectives()
    multi = len(objectives) > 1
    names = TrialNames(sweep)
    search = searcher(sweep, added.index if added else 0, told)  # added: the budget goes on
    search_alg, concurrent = with_budget(search, sweep, slots, tracking_uri, parent, added is None)
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=None if multi else objectives[0][0],
            mode=None if multi else objectives[0][1],
            search_alg=search_alg,
            scheduler=trial_scheduler(sweep, tracking_uri, parent),
            num_samples=samples,
            max_concurrent_trials=concurrent,
            # the next trial runs in the process the last one freed: no 5-7 s of
            # imports per trial (docs/design.md, "A sweep's schedule")
            reuse_actors=sweep.tune.reuse_actors,
            trial_name_creator=names.name,
            trial_dirname_creator=names.folder,
        ),
        run_config=run_config,
    )
    keep_tuner_copy(storage, path)  # written whole by now
    return tuner


@dataclass(frozen=True)
class DriverInputs:
    """What the command hands the driver besides the sweep file: how it reaches Ray, what it
    already checked, and its hooks (run_sweep's docstring says when each is called)."""

    address: str | None = None  # a running cluster to join; None: this machine's own Ray
    resume: bool = False
    sweep_yaml: str = ""  # the sweep as it runs, kept beside its state (segtune.sweep.edits)
    scan: Scan | None = None
    floor_miou: float | None = None
    trials_done: Callable[[str], None] | None = None
    before_timing: Callable[[], None] | None = None
    edits: Edits | None = None


@dataclass
class SweepOutcome:
    """What `run_sweep` tells the command: the parent run, failures, and the time account."""

    parent: str
    failed: int
    slots: int
    phases: dict[str, float] = field(default_factory=dict)  # seconds of each driver stage


def run_sweep(
    sweep: SweepConfig, tracking_uri: str, stop: StopSignals, given: DriverInputs
) -> SweepOutcome:
    """Run the sweep on the Ray the caller started (`segtune.sweep.ray_init`; stopped here once the
    trials end, before the runs are closed): cost stage, checks, Tuner. `stop` routes the
    caller's signals. Of `given`: `scan` is the driver's check of the dataset,
    handed to every trial (on every node the dataset has the same paths, checked first);
    `floor_miou` the colour-only floor of its validation split, kept on the sweep run;
    `trials_done` is called with the sweep run's id once every trial has ended, before Ray stops;
    `before_timing` before the cost stage times anything on this machine; `edits` the changes
    `--resume` accepted (`segtune.sweep.edits.check_edits`), made the sweep's once the lock is held.

    One driver per sweep name and run storage holds the sweep's lock; once the node checks pass
    it closes what the storage's previous driver of the name left RUNNING, and on SIGINT or
    SIGTERM it closes its own runs as KILLED and raises `SweepInterrupted` (exit status 130 or
    143)."""
    storage = RunStorage.of(sweep.tune.storage_path, sweep.tune.storage_endpoint)
    filesystem, _ = storage.filesystem
    try:  # the sweep's own state is enough: a driver may stop before Ray saves any
        restorable = given.resume and (
            tune.Tuner.can_restore(storage.path(sweep.name), storage_filesystem=filesystem)
            or bool(read_state(storage, sweep.name))
        )
    except OSError as exc:
        raise ConfigError(f"tune.storage_path {storage}: cannot read it ({exc})") from None
    if given.resume and not restorable:
        raise ConfigError(
            f"--resume: no interrupted sweep at {storage}/{sweep.name}; run without --resume"
        )
    with SweepLock(storage, sweep.name) as lock:
        outcome = SweepOutcome("", 0, 1)
        try:
            _fit(sweep, tracking_uri, given, storage, lock, stop, outcome)
            if not stop.stopped:  # a store that fails here (disk full) is a fault like any other
                MlflowClient(tracking_uri).set_terminated(
                    outcome.parent, "FAILED" if outcome.failed else "FINISHED"
                )
        except SegtuneError:
            if not stop.stopped:
                raise
        except Exception as exc:  # the stop's exception, maybe wrapped by Ray or MLflow
            if not stop.stopped:  # else a fault of the driver's own (disk full, Ray gone)
                end_failed(sweep, tracking_uri, storage, outcome.parent, exc)
            log.debug("stopping (%s): %s", stop.lost or stop.received, exc)
        if stop.stopped:  # stopped gracefully by Tune (state saved), or at once
            end_stopped(sweep, tracking_uri, storage, outcome.parent, stop)
    return outcome


def _fit(
    sweep: SweepConfig,
    tracking_uri: str,
    given: DriverInputs,
    storage: RunStorage,
    lock: SweepLock,
    stop: StopSignals,
    outcome: SweepOutcome,
) -> None:
    """The cost stage and the Tuner on the started Ray, filling `outcome` as they go (the parent
    run first, so that an interruption can close it); Ray stops at the end."""
    joined, configs = given.address is not None, _cost_stage_configs(sweep)
    phases = outcome.phases
    try:  # Ray stops here (finally), whatever happens
        started = time.perf_counter()
        if not joined:  # this machine alone: Ray's processes are up, and idle until the trials
            create_store_whole(tracking_uri)  # the cost stage may be the first to use it
            costs, measured = run_cost_stage(
                configs, sweep.bench, tracking_uri, joined=False, before_timing=given.before_timing
            )
            phases["cost_stage_s"] = time.perf_counter() - started
        started = time.perf_counter()
        check_cluster(sweep)
        check_nodes(sweep.data, storage, tracking_uri, joined, needed_weights(sweep))
        create_store_whole(tracking_uri)  # only now: no store is made before the checks pass
        client = MlflowClient(tracking_uri)
        state = read_state(storage, sweep.name)  # the previous driver's run
        previous = [state["parent_run_id"]] if state else []
        left = close_open_runs(
            client, sweep.experiment, previous, f"its driver ended without closing it; closed "
            f"by the next driver of this sweep at {now()}"
        )  # fmt: skip
        if left:
            log.warning("closed %d run(s) an earlier driver of this sweep left RUNNING", len(left))
        dataset = fingerprint(ensure_dataset(sweep.data, progress=False))
        earlier = [] if given.resume else earlier_trials(sweep, client, dataset)  # before the run
        parent = outcome.parent = _parent_run(
            sweep, storage, tracking_uri, given.sweep_yaml, given.resume, outcome
        )
        lock.parent(parent)
        client.set_tag(parent, DATASET_TAG, dataset)  # what a later warm start matches
        if given.edits is not None:
            commit(given.edits, sweep, storage, client, parent)
        if given.floor_miou is not None:
            client.log_metric(parent, FLOOR_METRIC, given.floor_miou)
        phases["nodes_s"] = time.perf_counter() - started
        if joined:  # one task per node kind, each holding its node while nothing else runs
            started = time.perf_counter()
            costs, measured = run_cost_stage(
                configs, sweep.bench, tracking_uri, joined=True, before_timing=given.before_timing
            )
            phases["cost_stage_s"] = time.perf_counter() - started
        started = time.perf_counter()
        excluded = exclude(sweep, configs, costs, client, parent)
        grid = len(configs) - excluded if sweep.tune.search == "grid" else 1
        outcome.slots = _slots(sweep, grid * sweep.tune.num_samples)
        resources = sweep.tune.resources_per_trial
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                sweep=sweep,
                parent_run_id=parent,
                tracking_uri=tracking_uri,
                scan=given.scan,
                measured=measured,
            ),
            {"cpu": resources.cpu, "gpu": resources.gpu},
        )
        # num_to_keep makes Tune save its state at every checkpoint, as meant (below); its
        # warning about that, every few seconds with short epochs, would bury the progress
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        main = storage.path(sweep.name)
        # the sweep's own experiment, then the trials --accept-changes added, one after another
        experiments: list[tuple[str, Addition | None]] = [(main, None)]
        experiments += [(posixpath.join(main, a.name), a) for a in additions(storage, sweep.name)]
        results = []
        with stop.graceful(), watch_server(tracking_uri, sweep.mlflow.outage_s, stop.give_up):
            for path, added in experiments:
                if not stop.stopped:
                    tuner = _tuner(sweep, storage, tracking_uri, parent, trainable, costs, path,
                                   given.resume, added, outcome.slots, earlier)  # fmt: skip
                    # restored or new: a sweep in which no trial can start ends in one line
                    give_up = partial(stop.give_up, close_runs=True)
                    with watch_stalls(tuner, give_up, stop.stop_now):
                        results += list(tuner.fit())
        phases["tuner_s"] = time.perf_counter() - started
        if given.trials_done is not None and not stop.stopped:
            given.trials_done(parent)
    finally:
        started = time.perf_counter()
        ray.shutdown()
    phases["stop_s"] = time.perf_counter() - started
    outcome.failed = sum(1 for r in results if r.error is not None)
