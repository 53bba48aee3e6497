"""The sweep file: its schema, the grammar of its `search_space`, and validation that reports
every problem at once, each with its key path, before anything starts.

Grammar (per `search_space` key): a scalar, or one of `grid_search`, `choice` (lists),
`uniform`, `loguniform` ([low, high] of a float key), `randint` ([low, high] of an int key, both
inclusive). A key that is not a trial key is a *group*: a `grid_search` or `choice` over mappings
of trial keys. Every value and bound is checked by TrialConfig's own field, the metric names
against what trials report, and the sweep's size by arithmetic, all before Ray starts.
`segtune.space` turns a valid sweep into Ray Tune's `param_space`. No Ray, no MLflow here.
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from segtune.config import (
    DataConfig,
    SizeText,
    TrialConfig,
    apply_overrides,
    format_validation_error,
    parse_yaml,
)
from segtune.errors import ConfigError, problems_message
from segtune.tracking.names import EPOCH_SCORES, REPORTED_METRICS

LIST_FORMS = ("grid_search", "choice")
RANGE_FORMS = ("uniform", "loguniform", "randint")  # [low, high]
SEARCH_FORMS = (*LIST_FORMS, *RANGE_FORMS)
# The most trials one sweep holds: each is a Ray trial in the experiment state that Tune rewrites
# at every checkpoint, and an MLflow run that the summary, the report and the tables load; at a
# minute a trial, 10 000 are a week of one slot. A larger study is several sweeps.
MAX_TRIALS = 10_000
# The most combinations of discrete values (grid_search and choice lists, seeds): the pre-flight
# and the cost stage build each one's trial configuration (100 000 take about 2 s and 80 MB).
MAX_COMBINATIONS = 100_000
MAX_DESCRIPTION = 4000  # characters: it becomes the sweep run's note (an MLflow tag, 8000 at most)


def search_form(spec: Any) -> tuple[str | None, Any]:
    """A `search_space` entry as (form, values): `(None, value)` for a fixed value."""
    if isinstance(spec, dict) and len(spec) == 1:
        return next(iter(spec.items()))
    return None, spec


def is_group(key: str) -> bool:
    """A `search_space` key that is not a trial key holds a list of mappings of trial keys."""
    return key not in TrialConfig.model_fields


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)  # fractions share a GPU between trials


class TuneSection(BaseModel):
    """How Ray Tune searches and schedules; `metric`/`mode` may be lists (multi-objective)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str | list[str] = "val_miou"
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = "max"
    search: Literal["grid", "random", "optuna"] = "grid"
    sampler: Literal["tpe", "nsga2"] = "tpe"
    scheduler: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    num_samples: int = Field(1, ge=1)
    repeats: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    resources_per_trial: Resources = Resources()
    max_failures: int = Field(1, ge=0)
    # a local folder (one machine, or a mount at the same path on every node) or a URI such
    # as s3://bucket/prefix; storage_endpoint: an S3-compatible server (MinIO, Ceph, ...)
    storage_path: str = "runs"
    storage_endpoint: str | None = None


class MlflowSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str | None = None
    experiment: str | None = None  # defaults to the sweep's name
    # how long a tracking server may be gone during a sweep: its trials wait at their next log
    # call, then the sweep stops with its state saved (segtune.tracking.outage)
    outage_s: float = Field(300.0, ge=5, le=1000)


class BenchSection(BaseModel):
    """The cost benchmark each trial runs on its best checkpoint (docs/design.md, cost measurement)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: SizeText = "1000x750"
    threads: int = Field(2, ge=1)

    repeats: int = Field(5, ge=1)
    warmup: int = Field(2, ge=0)
    gpu: bool = True


class SweepConfig(BaseModel):
    """A whole sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # a plain name: it names a folder of the run storage, so never `.` or `..`
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    # the sweep run's MLflow note: free text, but not a file's worth
    description: str = Field("", max_length=MAX_DESCRIPTION)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if value in (".", ".."):
            raise ValueError(f"{value!r} names a folder, not a sweep; use letters, digits, -_.")
        return value

    data: DataConfig = DataConfig()
    train: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, Any] = Field(default_factory=dict)
    tune: TuneSection = TuneSection()
    mlflow: MlflowSection = MlflowSection()
    bench: BenchSection = BenchSection()

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    def searched_keys(self) -> list[str]:
        """The trial keys the search space sets: its own keys, and those of its groups' mappings
        that take more than one value across them (a mapping without the key has `train`'s)."""
        keys: list[str] = []
        for key, spec in self.search_space.items():
            form, values = search_form(spec)
            if not is_group(key):
                keys.append(key)
            elif form is not None:
                mappings = [m for m in values if isinstance(m, dict)]
                for k in dict.fromkeys(k for mapping in mappings for k in mapping):
                    taken = {json.dumps(m.get(k, self._train_value(k)), default=str)
                             for m in mappings}  # fmt: skip
                    if len(taken) > 1:
                        keys.append(k)
        return list(dict.fromkeys(keys))

    def _train_value(self, key: str) -> Any:
        """A trial key's value where the search space does not set it: `train`'s, else the
        default."""
        if key in self.train:
            return self.train[key]
        field = _TRIAL_FIELDS.get(key)
        return field.default if field is not None else None

    def trial_label(self, cfg: TrialConfig) -> str:
        """A trial's run name: the label, the other searched keys (`lr=0.003`), the repeat's seed."""
        return cfg.label(self.searched_keys(), seed=self.tune.repeats > 1)

    def config_label(self, cfg: TrialConfig) -> str:
        """`trial_label` without the seed: the name of the configuration that seeds repeat."""
        return cfg.label(self.searched_keys())

    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) pairs: one for a single objective, several for multi-objective."""
        metrics = [self.tune.metric] if isinstance(self.tune.metric, str) else self.tune.metric
        modes = [self.tune.mode] if isinstance(self.tune.mode, str) else self.tune.mode
        return list(zip(metrics, modes, strict=False))


_TRIAL_FIELDS = TrialConfig.model_fields


def _check_trial_values(values: Mapping[str, Any], where: str, problems: list[str]) -> None:
    """Type-check trial keys against TrialConfig, one problem line per key."""
    try:
        TrialConfig.model_validate(dict(values))
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, where).splitlines())


def _did_you_mean(word: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, names, 1)
    return f" (did you mean {close[0]}?)" if close else ""


def _value_problem(key: str, value: Any) -> str | None:
    """What TrialConfig's own field says of `value` for `key`, or None when it takes it."""
    try:
        TrialConfig.model_validate({key: value})
    except ValidationError as exc:
        return str(exc.errors()[0]["msg"])
    return None


def _kind_text(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return {bool: "true or false", str: "text"}.get(annotation) or getattr(
        annotation, "__name__", str(annotation)
    )


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_param(key: str, spec: Any, where: str, problems: list[str]) -> None:
    """One search-space entry: a scalar, or one of SEARCH_FORMS over values the key takes."""
    if not isinstance(spec, dict):
        _check_trial_values({key: spec}, where.rsplit(".", 1)[0], problems)
        return
    form, values = search_form(spec)
    if form not in SEARCH_FORMS:
        got = f"unknown form {form!r}" if form is not None else f"a mapping of {len(spec)} keys"
        problems.append(f"{where}: {got}; expected a value or one of {', '.join(SEARCH_FORMS)}")
        return
    mappings = isinstance(values, list) and all(isinstance(v, dict) for v in values)
    if is_group(key) and (form not in LIST_FORMS or not mappings):
        problems.append(
            f"{where}: '{key}' is not a trial key{_did_you_mean(key, list(_TRIAL_FIELDS))}; a "
            f"group key must hold a list of mappings of trial keys (valid trial keys: "
            f"{', '.join(_TRIAL_FIELDS)})"
        )
        return
    if form in RANGE_FORMS:
        _check_range(key, form, values, f"{where}.{form}", problems)
        return
    if not isinstance(values, list) or not values:
        problems.append(f"{where}.{form}: expected a non-empty list")
        return
    for i, value in enumerate(values):
        at = f"{where}.{form}[{i}]"
        if is_group(key):
            unknown = sorted(set(value) - set(_TRIAL_FIELDS))
            if unknown:
                problems.append(f"{at}: unknown trial keys {unknown}")
            _check_trial_values({k: v for k, v in value.items() if k in _TRIAL_FIELDS}, at,
                                problems)  # fmt: skip
        elif (problem := _value_problem(key, value)) is not None:
            problems.append(f"{at}: {problem}")


def _check_range(key: str, form: str, values: Any, where: str, problems: list[str]) -> None:
    """[low, high] of a numeric key: randint for an int key, uniform or loguniform for a float
    one; each bound a value the key's field takes, low below high, and above 0 on a log scale."""
    kind = _TRIAL_FIELDS[key].annotation
    if kind not in (int, float):
        problems.append(f"{where}: {key} takes {_kind_text(kind)}, not a range of numbers: list "
                        "its values with choice or grid_search")  # fmt: skip
        return
    if (kind is int) != (form == "randint"):
        fix = "randint [low, high]" if kind is int else "uniform or loguniform"
        problems.append(f"{where}: {key} takes {'integers' if kind is int else 'real numbers'}, "
                        f"not what {form} samples: use {fix}")  # fmt: skip
        return
    numbers = (int,) if kind is int else (int, float)
    if (
        not isinstance(values, list)
        or len(values) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers) for v in values)
    ):
        what = "integers" if kind is int else "numbers"
        problems.append(f"{where}: expected [low, high], two {what}; got {_shown(values)}")
        return
    low, high = values
    if form == "loguniform" and low <= 0:
        problems.append(f"{where}: need 0 < low < high on a log scale; got {_shown(values)}")
        return
    bounds = [(i, _value_problem(key, v)) for i, v in enumerate(values)]
    problems.extend(f"{where}[{i}]: {problem}" for i, problem in bounds if problem is not None)
    if all(problem is None for _, problem in bounds) and low >= high:
        problems.append(f"{where}: need low < high; got {_shown(values)}")


def validate_sweep(raw: Mapping[str, Any]) -> SweepConfig:
    """Every problem of a sweep, each with its key path, at once, as one ConfigError."""
    problems: list[str] = []
    sweep: SweepConfig | None = None
    try:
        sweep = SweepConfig.model_validate(dict(raw))
    except ValidationError as exc:
        problems.extend(format_validation_error(exc).splitlines())
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    _check_trial_values(train, "train", problems)
    space = raw.get("search_space") if isinstance(raw.get("search_space"), dict) else {}
    for key, spec in space.items():
        _check_param(key, spec, f"search_space.{key}", problems)
    if sweep is not None:
        problems.extend(_check_tune(sweep))
    if problems:
        raise ConfigError(problems_message("invalid sweep", list(dict.fromkeys(problems))))
    assert sweep is not None
    return sweep


def _forms(space: Mapping[str, Any]) -> set[str]:
    return {form for form, _ in map(search_form, space.values()) if form is not None}


def _check_tune(sweep: SweepConfig) -> list[str]:
    tune, problems = sweep.tune, []
    metrics = [tune.metric] if isinstance(tune.metric, str) else tune.metric
    modes = [tune.mode] if isinstance(tune.mode, str) else tune.mode
    forms = _forms(sweep.search_space)
    if not metrics:
        problems.append("tune.metric: name the metric to optimise, e.g. val_miou")
    for metric in dict.fromkeys(metrics):
        if metric not in REPORTED_METRICS:
            problems.append(
                f"tune.metric: {metric!r} is not a metric trials report"
                f"{_did_you_mean(metric, REPORTED_METRICS)}; one of {', '.join(REPORTED_METRICS)}"
            )
    if len(metrics) != len(modes):
        problems.append(f"tune.mode: {len(modes)} modes for {len(metrics)} metrics")
    if len(metrics) > 1:
        if tune.search != "optuna":
            problems.append(
                "tune.metric: several metrics (multi-objective) need tune.search: optuna"
            )
        if tune.scheduler != "fifo":
            problems.append(
                "tune.scheduler: asha stops trials on one metric; use fifo with several metrics"
            )
    if tune.search == "grid" and forms & {"uniform", "loguniform", "randint", "choice"}:
        problems.append(
            "tune.search: grid expands only grid_search; sample uniform/loguniform/randint/choice "
            "with tune.search: random or optuna"
        )
    if tune.search == "optuna" and "grid_search" in forms:
        problems.append("tune.search: optuna cannot take grid_search; use choice instead")
    if tune.search == "optuna" and tune.repeats > 1:
        problems.append("tune.repeats: seeds per configuration need tune.search grid or random")
    epochs = sweep.train.get("epochs", TrialConfig.model_fields["epochs"].default)
    if tune.scheduler == "asha" and isinstance(epochs, int) and tune.grace_period >= epochs:
        problems.append(
            f"tune.grace_period: {tune.grace_period} must be below train.epochs ({epochs}) for asha"
        )
    first = metrics[0] if metrics else ""  # an unknown name is said once, above
    if tune.scheduler == "asha" and first in REPORTED_METRICS and first not in EPOCH_SCORES:
        problems.append(f"tune.metric: asha needs a per-epoch metric, not {first}")
    return problems + _size_problems(sweep)


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**15 else f"about 10^{int(math.log10(n))}"


def _size_problems(sweep: SweepConfig) -> list[str]:
    """The sweep's trials and discrete combinations, counted by arithmetic (their enumeration
    is what this bound prevents): num_samples runs each grid point, each seed a grid point."""
    tune, grid, choices = sweep.tune, 1, 1
    for spec in sweep.search_space.values():
        form, values = search_form(spec)
        if form in LIST_FORMS and isinstance(values, list):
            if form == "grid_search":
                grid *= len(values)
            else:
                choices *= len(values)
    trials = tune.num_samples * grid * tune.repeats
    problems = []
    if trials > MAX_TRIALS:
        problems.append(
            f"sweep size: {_count(trials)} trials (num_samples {_count(tune.num_samples)} x "
            f"{_count(grid)} grid point{'s' * (grid != 1)} x repeats {_count(tune.repeats)}), more than the "
            f"{MAX_TRIALS:,} one sweep holds (each is a Ray trial and an MLflow run): split the "
            "study into several sweeps"
        )
    combinations = grid * choices * tune.repeats
    if combinations > MAX_COMBINATIONS and grid * tune.repeats <= MAX_TRIALS:
        problems.append(
            f"search_space: {_count(combinations)} combinations of grid_search and choice values "
            f"(and seeds), more than the {MAX_COMBINATIONS:,} the pre-flight checks one by one: "
            "list fewer values, or sample numbers from a range (uniform, loguniform, randint)"
        )
    return problems


def load_sweep(path: Path | str, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read, override and validate a sweep file (yaml.safe_load; all problems at once)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a sweep file (e.g. sweeps/quickstart.yaml)")
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a text file in UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: a sweep file is a mapping with name, data, train, search_space, tune"
        )
    try:
        return validate_sweep(apply_overrides(raw, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
