"""Warm starts (`tune.warm_start`): what earlier sweeps on the same data already finished.

The finished trial runs of the named experiments' sweeps whose dataset fingerprint
(DATASET_TAG on the sweep run) is this sweep's are read from MLflow. Optuna is told them before
its first suggestion (`segtune.sweep.optuna_search`: one completed Optuna trial each, so that TPE and
NSGA-II start from what is known); a grid leaves out each configuration an earlier run finished
with the same trial keys, seed included (`skip_finished`). The sweep run names them all
(REUSED_TAG), for the summary and the report, with links to the runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune

from segtune.config.grammar import is_group, search_form
from segtune.config.names import (
    CONFIG_LABEL_TAG,
    DATASET_TAG,
    OBJECTIVE,
    REUSED_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    format_metric,
)
from segtune.config.sweep import SweepConfig
from segtune.errors import ConfigError
from segtune.sweep.space import GRID_KEY, fixed_values, param_space, resolve_trial
from segtune.tracking.query import reused_runs
from segtune.tracking.runs import run_page, run_params

log = logging.getLogger(__name__)

MAX_TAG = 7900  # characters of run ids on REUSED_TAG (MLflow keeps 8000)


@dataclass(frozen=True)
class Told:
    """An earlier trial to tell Optuna: its point in this sweep's space, its objective values
    and its metrics (the costs among them, for its constraint values)."""

    point: dict[str, Any]
    values: list[float]
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Earlier:
    """A finished trial run of an earlier sweep."""

    run_id: str
    experiment: str
    label: str
    params: dict[str, str]
    metrics: dict[str, float]


def earlier_trials(sweep: SweepConfig, client: MlflowClient, dataset: str) -> list[Earlier]:
    """The finished trials of the `tune.warm_start` experiments' sweeps on dataset `dataset`
    (a fingerprint); an experiment whose sweeps ran on other data is skipped with a line."""
    found: list[Earlier] = []
    for name in sweep.tune.warm_start:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise ConfigError(f"tune.warm_start: no experiment {name!r} at this tracking URI")
        ids = [experiment.experiment_id]
        sweeps = client.search_runs(ids, f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'")
        same = [s.info.run_id for s in sweeps if s.data.tags.get(DATASET_TAG) == dataset]
        if not same:
            other = sorted({s.data.tags.get(DATASET_TAG, "not recorded") for s in sweeps})
            log.warning(
                "warm start: experiment %r skipped: its sweeps ran on other data (dataset "
                "fingerprint %s; this sweep's is %s)", name, ", ".join(other) or "none", dataset
            )  # fmt: skip
            continue
        for parent in same:
            runs = client.search_runs(
                ids,
                f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and tags.`{ROLE_TAG}` = "
                f"'{ROLE_TRIAL}' and attributes.status = 'FINISHED'",
            )
            for r in runs:
                label = r.data.tags.get(CONFIG_LABEL_TAG) or r.info.run_name
                found.append(Earlier(r.info.run_id, name, label, r.data.params, r.data.metrics))
    if found and sweep.tune.search == "grid":  # refused before the sweep's run if none is left
        skip_finished(sweep, param_space(sweep), found)
    return found


def _params(sweep: SweepConfig, config: Mapping[str, Any]) -> dict[str, str]:
    """The params a trial of `config` (Ray's config of one trial) would log."""
    return run_params(resolve_trial(sweep, config).model_dump(mode="json"))


def skip_finished(
    sweep: SweepConfig, space: dict[str, Any], earlier: Sequence[Earlier]
) -> tuple[dict[str, Any], list[Earlier]]:
    """A grid's `param_space` without the configurations earlier runs finished (every trial key
    alike, the seed too), and those runs."""
    finished = {frozenset(e.params.items()): e for e in earlier}
    kept, reused = [], []
    for combo in space[GRID_KEY]["grid_search"]:
        match = finished.get(frozenset(_params(sweep, combo).items()))
        if match is None:
            kept.append(combo)
        else:
            reused.append(match)
    if not kept:
        raise ConfigError(
            f"tune.warm_start: every configuration of this grid finished in "
            f"{', '.join(sweep.tune.warm_start)}; nothing is left to train"
        )
    return {GRID_KEY: tune.grid_search(kept)}, reused


def optuna_point(sweep: SweepConfig, params: Mapping[str, str]) -> dict[str, Any] | None:
    """An earlier run's values in this sweep's sampled space (a group as the index of its
    mapping), or None where the run is no point of it or differs in a key it does not sample
    (the seed aside: another seed still tells where the good region is)."""
    point: dict[str, Any] = {}
    for key, spec in sweep.search_space.items():
        form, values = search_form(spec)
        if form == "choice":
            group = is_group(key)
            agree = [
                i if group else value
                for i, value in enumerate(values)
                if all(_params(sweep, {key: i if group else value})[k] == params.get(k)
                       for k in (value if group else [key]))
            ]  # fmt: skip
            if not agree:
                return None
            point[key] = agree[0]
        elif form in ("uniform", "loguniform", "randint") and key in params:
            point[key] = (int if form == "randint" else float)(params[key])
    own = _params(sweep, {**fixed_values(sweep), **point})
    keys = (set(own) | set(params)) - {"seed"}
    return point if all(own.get(k) == params.get(k) for k in keys) else None


def told_points(sweep: SweepConfig, earlier: Sequence[Earlier]) -> tuple[list[Told], list[Earlier]]:
    """What to tell Optuna of each earlier run that is a point of this sweep's space with every
    objective recorded, and those runs."""
    told, used = [], []
    for run in earlier:
        point = optuna_point(sweep, run.params)
        values = [run.metrics.get(metric) for metric, _ in sweep.objectives()]
        if point is not None and None not in values:
            told.append(Told(point, [float(v) for v in values if v is not None], run.metrics))
            used.append(run)
    return told, used


def record_reused(client: MlflowClient, parent: str, reused: Sequence[Earlier]) -> None:
    """Name the reused runs on the sweep run (as many as the tag holds)."""
    ids = ""
    for run in reused:
        if len(ids) + len(run.run_id) + 1 > MAX_TAG:
            break
        ids = f"{ids},{run.run_id}" if ids else run.run_id
    if ids:
        client.set_tag(parent, REUSED_TAG, ids)


def reused_lines(tracking_uri: str, parent: str) -> list[str]:
    """The summary's lines on the earlier runs this sweep reused, each with its link."""
    runs = reused_runs(tracking_uri, [parent])
    lines = [f"\nreused from earlier sweeps (warm start): {len(runs)} run(s)"] if runs else []
    for run in runs:
        page = run_page(tracking_uri, str(run["experiment_id"]), str(run["run_id"]))
        link = page or f"run {run['run_id']}"
        lines.append(f"  {run['label']}: mIoU {format_metric(run[OBJECTIVE], '{:.3f}')}  {link}")
    return lines


def warm_space(
    sweep: SweepConfig,
    space: dict[str, Any],
    earlier: Sequence[Earlier],
    client: MlflowClient,
    parent: str,
) -> tuple[dict[str, Any], list[Told]]:
    """The sweep's `param_space` (a grid without what earlier runs finished) and the points to
    tell Optuna; the runs reused are named on the sweep run."""
    if not earlier:
        return space, []
    told: list[Told] = []
    if sweep.tune.search == "grid":
        space, reused = skip_finished(sweep, space, earlier)
    else:
        told, reused = told_points(sweep, earlier)
    record_reused(client, parent, reused)
    log.warning(
        "warm start: %d earlier finished trial(s) reused; %d left out (another point, other "
        "trial keys, or no %s)", len(reused), len(earlier) - len(reused),
        " and ".join(m for m, _ in sweep.objectives()),
    )  # fmt: skip
    return space, told
