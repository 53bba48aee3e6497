"""The sweep file's search-space grammar, turned into a Ray Tune `param_space`.

Grammar (per `search_space` key): a scalar, or one of `grid_search`, `choice` (lists),
`uniform`, `loguniform` ([low, high] of a float key), `randint` ([low, high] of an int key, both
inclusive). A key that is not a trial key is a *group*: a `grid_search` or `choice` over mappings of trial keys, which
expresses non-Cartesian sets such as the study's Task 3 (UNet, and DeepLab over three backbones).
The grammar itself (`search_form`, `is_group`) and its validation live in `segtune.config.grammar`,
which also bounds the sweep's size, so that what is enumerated here is at most 100 000 points.
Impossible combinations (e.g. deeplabv3 without a backbone) are rejected before anything starts.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ray import tune

from segtune.config.grammar import is_group, search_form
from segtune.config.sweep import SweepConfig
from segtune.config.trial import TrialConfig, trial_config
from segtune.errors import ConfigError, problems_message
from segtune.models import check_model_config

MAX_CHECKED_COMBINATIONS = 5000
GRID_KEY = "trial"  # a grid sweep's param_space: its combinations, in the order they start
# a random sweep under tune.constraints: its choice values, drawn among the feasible ones
DRAWN_KEY = "drawn"


def _discrete(sweep: SweepConfig) -> dict[str, list[Any]]:
    """The discrete dimensions (grid_search and choice) with their values."""
    dims = {}
    for key, spec in sweep.search_space.items():
        form, values = search_form(spec)
        if form in ("grid_search", "choice"):
            dims[key] = list(values)
    if sweep.tune.repeats > 1:
        dims["seed"] = seeds(sweep)
    return dims


def seeds(sweep: SweepConfig) -> list[int]:
    base = int(sweep.train_value("seed"))
    return [base + i for i in range(sweep.tune.repeats)]


def resolve_trial(sweep: SweepConfig, sampled: Mapping[str, Any]) -> TrialConfig:
    """A sampled Ray config to the trial configuration: defaults, then values, groups merged.

    Optuna samples a group as the index of its mapping (its categories must be scalars); a grid
    sweep's combination comes whole, under GRID_KEY.
    """
    for whole in (GRID_KEY, DRAWN_KEY):
        if whole in sampled:
            sampled = {**sampled[whole], **{k: v for k, v in sampled.items() if k != whole}}
    values: dict[str, Any] = dict(sweep.train)
    for key, value in sampled.items():
        if key not in sweep.search_space and not (key == "seed" and sweep.tune.repeats > 1):
            continue
        if is_group(key):
            if isinstance(value, int):
                value = search_form(sweep.search_space[key])[1][value]
            values.update(value)
        else:
            values[key] = value
    return trial_config(values)


def fixed_values(sweep: SweepConfig) -> dict[str, Any]:
    """The search space's plain values: a sampled trial's config holds them besides its draws."""
    return {k: v for k, v in sweep.search_space.items() if search_form(v)[0] is None}


def discrete_trials(sweep: SweepConfig) -> list[TrialConfig]:
    """Every combination of the discrete dimensions: for a grid sweep, its trials."""
    return [resolve_trial(sweep, combo) for combo in _combinations(sweep)]


def _combinations(sweep: SweepConfig) -> Iterator[dict[str, Any]]:
    dims = _discrete(sweep)
    fixed = fixed_values(sweep)
    keys = list(dims)
    for combo in itertools.product(*(dims[k] for k in keys)):
        yield {**fixed, **dict(zip(keys, combo, strict=True))}


def check_combinations(sweep: SweepConfig) -> None:
    """Every problem of the discrete combinations (arch x backbone x ...), each named once, as
    one ConfigError."""
    problems: dict[str, None] = {}
    for i, combo in enumerate(_combinations(sweep)):
        if i >= MAX_CHECKED_COMBINATIONS:
            break
        try:
            check_model_config(resolve_trial(sweep, combo))
        except ConfigError as exc:
            problems[f"search_space: {combo_label(combo)}: {exc}"] = None
    if problems:
        head = "impossible combination" + "s" * (len(problems) > 1)
        raise ConfigError(problems_message(head, list(problems)))


def combo_label(combo: Mapping[str, Any]) -> str:
    flat: dict[str, Any] = {}
    for key, value in combo.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return ", ".join(f"{k}={v}" for k, v in flat.items())


def param_space(
    sweep: SweepConfig,
    duration: Callable[[TrialConfig], float] | None = None,
    keep: Callable[[TrialConfig], bool] | None = None,
) -> dict[str, Any]:
    """The Ray Tune param_space of a sweep (trial defaults are applied in `resolve_trial`).

    A grid sweep is one grid dimension over its combinations, so that the order in which its
    trials start is ours: longest first by `duration` (an estimate), which keeps the slots
    busy to the end instead of leaving the longest trial to run alone. `keep` says which
    configurations may train (tune.constraints): a grid's others are left out, and a random
    sweep draws its choice values among the combinations it keeps.
    """
    if sweep.tune.search == "grid":
        combos = kept(sweep, list(_combinations(sweep)), keep)
        if duration is not None:
            combos.sort(key=lambda combo: -duration(resolve_trial(sweep, combo)))
        return {GRID_KEY: tune.grid_search(combos)}
    optuna = sweep.tune.search == "optuna"
    space: dict[str, Any] = {}
    for key, spec in sweep.search_space.items():
        form, values = search_form(spec)
        if form is None:
            space[key] = values
        elif form == "grid_search":
            space[key] = tune.grid_search(values)
        elif form == "choice":
            group = is_group(key) and optuna
            space[key] = tune.choice(list(range(len(values))) if group else values)
        elif form == "uniform":
            space[key] = tune.uniform(*values)
        elif form == "loguniform":
            space[key] = tune.loguniform(*values)
        elif form == "randint":
            space[key] = tune.randint(values[0], values[1] + 1)  # Ray's upper bound is exclusive
    if sweep.tune.repeats > 1:
        space["seed"] = tune.grid_search(seeds(sweep))
    if keep is not None and sweep.tune.search == "random":
        space = _feasible_draws(sweep, space, keep)
    return space


def kept(
    sweep: SweepConfig,
    combos: list[dict[str, Any]],
    keep: Callable[[TrialConfig], bool] | None,
) -> list[dict[str, Any]]:
    """The grid combinations whose trials `keep` keeps: the sweep's own, and those that
    `--resume --accept-changes` adds (which must obey its constraints alike)."""
    return combos if keep is None else [c for c in combos if keep(resolve_trial(sweep, c))]


@dataclass(frozen=True)
class _Draw:
    """Ray's `sample_from` of a constrained random sweep: a feasible combination of the choice
    values, uniformly, for the grid values already resolved (by their JSON)."""

    feasible: dict[str, list[dict[str, Any]]]

    def __call__(self, spec: Any) -> dict[str, Any]:
        grid = spec["config"].get(GRID_KEY, {})  # Ray's variant generator hands the whole spec
        return random.choice(self.feasible[json.dumps(grid, sort_keys=True, default=str)])


def _feasible_draws(
    sweep: SweepConfig, space: dict[str, Any], keep: Callable[[TrialConfig], bool]
) -> dict[str, Any]:
    """A random sweep's space with its grid_search and choice keys replaced: the grid values that
    have a feasible choice under GRID_KEY, and a draw among those choices under DRAWN_KEY."""
    forms = {key: search_form(spec) for key, spec in sweep.search_space.items()}
    grids = {k: v for k, (form, v) in forms.items() if form == "grid_search"}
    choices = {k: v for k, (form, v) in forms.items() if form == "choice"}
    fixed = fixed_values(sweep)
    feasible: dict[str, list[dict[str, Any]]] = {}
    points = []
    for grid_values in itertools.product(*grids.values()):
        grid = dict(zip(grids, grid_values, strict=True))
        drawn = (dict(zip(choices, v, strict=True)) for v in itertools.product(*choices.values()))
        kept = [c for c in drawn if keep(resolve_trial(sweep, {**fixed, **grid, **c}))]
        if kept:
            feasible[json.dumps(grid, sort_keys=True, default=str)] = kept
            points.append(grid)
    space = {k: v for k, v in space.items() if k not in grids and k not in choices}
    if grids:
        space[GRID_KEY] = tune.grid_search(points)
    if choices and points:
        space[DRAWN_KEY] = tune.sample_from(_Draw(feasible))
    return space


def describe(sweep: SweepConfig) -> list[str]:
    """Lines describing a sampled space, for --dry-run of random and Optuna sweeps."""
    lines = [f"{key}: {spec}" for key, spec in sweep.search_space.items()]
    if sweep.tune.repeats > 1:
        lines.append(f"seed: grid_search {seeds(sweep)}")
    return lines
