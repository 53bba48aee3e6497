"""A resumed sweep against the file it started with: edits that alter trials are refused before
Ray starts, or with `--accept-changes` turned into trials added to the sweep.

The driver that starts a sweep keeps the sweep as it ran it (the file after its `--set`s, every
default filled in, paths absolute) as `segtune_sweep.yaml` beside the sweep's state file
(`segtune_sweep.json`: the sweep run's id and the trials added since). `--resume` compares the
sweep it is given with that copy, key by key, and judges each changed key by its rule below.
Ray's `Tuner.restore` keeps the param space it started with, so added trials run as Ray
experiments of their own (`added-1`, ... in the sweep's storage folder) under the same sweep run,
after the sweep's own; the state file names them, so a later `--resume` continues them too.
No Ray, no MLflow here, but in `commit`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from segtune.config.sweep import SweepConfig
from segtune.config.trial import format_validation_error
from segtune.errors import ConfigError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from segtune.sweep.storage import RunStorage

log = logging.getLogger(__name__)
SWEEP_STATE_FILE = "segtune_sweep.json"  # beside Ray's experiment state: the sweep run's id
SWEEP_COPY_FILE = "segtune_sweep.yaml"  # beside it: the sweep as its first driver ran it
START_NEW = "start a new sweep (another name:)"

# keys that leave every trial as it was: accepted on --resume with a note saying why
NOTE_KEYS = {
    "description": "the sweep run's note, now updated",
    "mlflow.outage_s": "how long the driver waits for a tracking server",
    "tune.storage_path": "where the run storage is, not what it holds",
    "tune.storage_endpoint": "how the run storage is reached, not what it holds",
    "tune.resources_per_trial": "how much of a node a trial takes, not what it computes",
    **{
        f"tune.{key}": "Ray keeps the sweep's first value for the trials it restores; trials"
        " added by --accept-changes take the new one"
        for key in ("max_concurrent_trials", "max_failures", "reuse_actors")
    },
}
_SEARCH = "Ray restores the sweep's own searcher and scheduler, which cannot change"
_RUNS = "the sweep's runs are in the store and experiment it started in"
# keys no edit may change, even with --accept-changes: the trials so far would not compare
FIXED_KEYS = {
    "name": "it names the sweep's storage folder",
    "data": "the trials so far ran on the old data, and their scores would not compare",
    "bench": "the trials so far were timed by the old benchmark, and their costs would not compare",
    **{
        f"tune.{key}": _SEARCH
        for key in (
            "search",
            "sampler",
            "scheduler",
            "grace_period",
            "reduction_factor",
            "metric",
            "mode",
        )
    },  # fmt: skip
    "mlflow.tracking_uri": _RUNS,
    "mlflow.experiment": _RUNS,
}
# every other key (train, search_space, tune.num_samples, tune.repeats) alters trials: refused,
# or with --accept-changes judged by the trials the new sweep has and the old one has not


@dataclass(frozen=True)
class Addition:
    """Trials added to a sweep by `--accept-changes`: a Ray experiment of their own, `name`
    under the sweep's storage folder. A grid sweep's are its new combinations (`trials`, each
    a value of `space.GRID_KEY`); a sampled sweep's, `samples` more draws from its space, by a
    sampler seeded `index` apart from the sweep's (else Optuna would draw the same points)."""

    index: int
    trials: list[dict[str, Any]] | None = None
    samples: int = 1

    @property
    def name(self) -> str:
        return f"added-{self.index}"

    @property
    def count(self) -> int:
        return len(self.trials) if self.trials is not None else self.samples


@dataclass(frozen=True)
class Edits:
    """What `--resume` found: whether the copy must be written again (changed, or missing),
    and the trials `--accept-changes` adds."""

    save: bool = False
    added: Addition | None = None


def sweep_text(sweep: SweepConfig) -> str:
    """The sweep as the driver runs it: the sweep run's `sweep.yaml` and the saved copy."""
    return yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False)


def flat(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to values; a `search_space` entry is one key (its form and values)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and prefix != "search_space.":
            out.update(flat(value, path + "."))
        else:
            out[path] = value
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ, in the file's order."""
    a, b = flat(old), flat(new)
    missing = object()
    return [k for k in dict.fromkeys([*a, *b]) if a.get(k, missing) != b.get(k, missing)]


def rule(key: str, table: dict[str, str]) -> str | None:
    """The entry of `table` for a dotted key or a section above it."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = table.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def read_state(storage: RunStorage, name: str) -> dict[str, Any]:
    """The sweep's state file (its sweep run's id, the trials added since), {} where there is
    none; a damaged one is one line."""
    text = storage.read_text(name, SWEEP_STATE_FILE)
    try:
        state = json.loads(text) if text else {}
        if not isinstance(state, dict) or (state and "parent_run_id" not in state):
            raise ValueError("no sweep run id in it")
    except ValueError as exc:
        raise ConfigError(
            f"sweep {name}: its state file, {storage.path(name, SWEEP_STATE_FILE)}, is damaged "
            f"({exc}); {START_NEW}"
        ) from None
    return state


def check_edits(sweep: SweepConfig, accept: bool) -> Edits:
    """`--resume`'s comparison of `sweep` with the copy its first driver saved, before Ray
    starts: refused in one line (ConfigError), or the edits accepted."""
    from segtune.sweep.storage import RunStorage

    storage = RunStorage.of(sweep.tune.storage_path, sweep.tune.storage_endpoint)
    text = storage.read_text(sweep.name, SWEEP_COPY_FILE)
    if text is None:
        if storage.read_text(sweep.name, SWEEP_STATE_FILE) is None:
            return Edits()  # no sweep to resume: run_sweep says so
        if accept:
            raise ConfigError(
                f"--accept-changes: sweep {sweep.name} keeps no copy of the file it started with "
                "(started by an older segtune), so nothing tells which trials are new; resume "
                f"without it, or {START_NEW}"
            )
        log.warning("--resume: sweep %s keeps no copy of the file it started with (started by "
                    "an older segtune): edits since then cannot be checked; this file is kept "
                    "for the next --resume", sweep.name)  # fmt: skip
        return Edits(save=True)
    old = _saved_sweep(text, storage.path(sweep.name, SWEEP_COPY_FILE))
    new = yaml.safe_load(sweep_text(sweep))
    keys = changed_keys(old.model_dump(mode="json"), new)
    if not keys:
        return Edits()
    fixed = [k for k in keys if rule(k, FIXED_KEYS)]
    if fixed:
        why = "; ".join(dict.fromkeys(str(rule(k, FIXED_KEYS)) for k in fixed))
        raise ConfigError(
            f"--resume: {', '.join(fixed)} cannot change in a started sweep ({why}); put "
            f"{'them' if len(fixed) > 1 else 'it'} back as the sweep started, or {START_NEW}"
        )
    trial_keys = [k for k in keys if not rule(k, NOTE_KEYS)]
    if trial_keys and not accept:
        raise ConfigError(
            f"--resume: sweep {sweep.name}'s file changed since it started, in keys that alter "
            f"its trials ({', '.join(trial_keys)}); {START_NEW}, or pass --resume "
            "--accept-changes to run the trials the edit adds"
        )
    for key in (k for k in keys if rule(k, NOTE_KEYS)):
        log.info("--resume: %s changed since the sweep started; accepted: %s", key,
                 rule(key, NOTE_KEYS))  # fmt: skip
    if not trial_keys:
        return Edits(save=True)
    count = len(read_state(storage, sweep.name).get("added", [])) + 1
    added = _added(old, sweep, trial_keys, count)
    log.info("--resume --accept-changes: %d trial(s) added to sweep %s (%s), run after its own",
             added.count if added else 0, sweep.name, ", ".join(trial_keys))  # fmt: skip
    return Edits(save=True, added=added)


def _saved_sweep(text: str, where: str) -> SweepConfig:
    """The saved copy as a sweep; a damaged one is one line that says what to do."""
    try:
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise ValueError("not a mapping of a sweep's sections")
        return SweepConfig.model_validate(raw)
    except (yaml.YAMLError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        lines = (
            format_validation_error(exc).splitlines()
            if isinstance(exc, ValidationError)
            else str(exc).splitlines()[:1]
        )
        reason = "; ".join(lines)
        raise ConfigError(
            f"--resume: the saved copy of the sweep's file, {where}, is damaged ({reason}); "
            f"delete it to resume without checking edits, or {START_NEW}"
        ) from None


def _added(old: SweepConfig, new: SweepConfig, keys: list[str], index: int) -> Addition | None:
    """The trials `new` has and `old` has not; refused where `new` drops or changes any."""
    search = new.tune.search
    if search != "grid":
        other = [k for k in keys if k != "tune.num_samples"]
        if other:
            raise ConfigError(
                f"--resume --accept-changes: a {search} sweep takes more samples only "
                f"(tune.num_samples); {', '.join(other)} changes the space its trials were "
                f"drawn from: put it back, or {START_NEW}"
            )
        more = new.tune.num_samples - old.tune.num_samples
        if more < 0:
            raise ConfigError(
                f"--resume --accept-changes: tune.num_samples {old.tune.num_samples} -> "
                f"{new.tune.num_samples} drops samples the sweep has; an edit can only add "
                f"trials: put it back, or {START_NEW}"
            )
        return Addition(index, samples=more) if more else None
    had, has = _grid(old), _grid(new)
    dropped = list((Counter(key for key, _ in had) - Counter(key for key, _ in has)).elements())
    if dropped:
        labels = {key: old.trial_label(cfg) for key, (_, cfg) in had}
        raise ConfigError(
            f"--resume --accept-changes: the edit drops or changes {len(dropped)} trial(s) the "
            f"sweep has ({', '.join(dict.fromkeys(labels[k] for k in dropped))}); an edit can "
            f"only add trials: put them back, or {START_NEW}"
        )
    left = Counter(key for key, _ in had)
    trials = []
    for key, (combo, _) in has:
        if left[key]:
            left[key] -= 1
        else:
            trials.append(combo)
    return Addition(index, trials=trials) if trials else None


def _grid(sweep: SweepConfig) -> list[tuple[str, tuple[dict[str, Any], Any]]]:
    """A grid sweep's trials (each combination num_samples times), each keyed by its whole
    trial configuration."""
    from segtune.sweep.space import GRID_KEY, param_space, resolve_trial

    trials = []
    for combo in param_space(sweep)[GRID_KEY]["grid_search"]:
        cfg = resolve_trial(sweep, {GRID_KEY: combo})
        trials.append((json.dumps(cfg.model_dump(mode="json"), sort_keys=True), (combo, cfg)))
    return trials * sweep.tune.num_samples


def additions(storage: RunStorage, name: str) -> list[Addition]:
    """The trials added to sweep `name` so far, as its state file names them."""
    return [Addition(**a) for a in read_state(storage, name).get("added", [])]


def commit(
    edits: Edits, sweep: SweepConfig, storage: RunStorage, client: MlflowClient, parent: str
) -> None:
    """Make the accepted edits the sweep's, once its driver holds the lock: the addition in the
    state file first (a driver stopped after it continues those trials on --resume), then the
    copy, the sweep run's `sweep.yaml` and its note."""
    from segtune.config.names import SWEEP_ARTIFACT

    if not edits.save:
        return
    if edits.added is not None:
        state = read_state(storage, sweep.name)
        state["added"] = [*state.get("added", []), asdict(edits.added)]
        storage.write_text(json.dumps(state), sweep.name, SWEEP_STATE_FILE)
    text = sweep_text(sweep)
    storage.write_text(text, sweep.name, SWEEP_COPY_FILE)
    client.log_text(parent, text, SWEEP_ARTIFACT)
    client.set_tag(parent, "mlflow.note.content", sweep.description)
