"""The sweep file: its schema, and validation that reports every problem at once, each with its
key path, before anything starts: the search space by `segtune.config.grammar` (each value against its
trial key, the sweep's size), the metric names against what trials report.
`segtune.sweep.space` turns a valid sweep into Ray Tune's `param_space`. No Ray, no MLflow here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from segtune.config.constraints import Constraint, constraints_of
from segtune.config.grammar import (
    check_param,
    check_trial_values,
    did_you_mean,
    is_group,
    search_form,
    size_problems,
)
from segtune.config.names import EPOCH_SCORES, MODEL_COSTS, REPORTED_METRICS
from segtune.config.trial import (
    DataConfig,
    SizeText,
    TrialConfig,
    apply_overrides,
    format_validation_error,
    parse_yaml,
)
from segtune.errors import ConfigError, problems_message
from segtune.paths import path_kind

MAX_DESCRIPTION = 4000  # characters: it becomes the sweep run's note (an MLflow tag, 8000 at most)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)  # fractions share a GPU between trials


class BudgetSection(BaseModel):
    """A compute budget (segtune.sweep.budget): no trial starts that would pass it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # GPU-hours on GPU trials, core-hours on CPU trials: resources_per_trial x wall hours
    device_hours: float | None = Field(None, gt=0)
    trial_epochs: int | None = Field(None, ge=1)


class TuneSection(BaseModel):
    """How Ray Tune searches and schedules; `metric`/`mode` may be lists (multi-objective)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str | list[str] = "val_miou"
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = "max"
    search: Literal["grid", "random", "optuna"] = "grid"
    sampler: Literal["tpe", "nsga2"] = "tpe"
    scheduler: Literal["fifo", "asha", "moasha"] = "fifo"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    num_samples: int = Field(1, ge=1)
    repeats: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    # a trial runs in the process the last trial of its slot freed (no imports per trial);
    # false: a fresh process per trial, for code that keeps state between trials
    reuse_actors: bool = True
    resources_per_trial: Resources = Resources()
    max_failures: int = Field(1, ge=0)
    # a local folder (one machine, or a mount at the same path on every node) or a URI such
    # as s3://bucket/prefix; storage_endpoint: an S3-compatible server (MinIO, Ceph, ...)
    storage_path: str = "runs"
    storage_endpoint: str | None = None
    budget: BudgetSection | None = None
    # earlier experiments whose finished trials on the same dataset seed this sweep
    # (segtune.sweep.warm): one name or a list
    warm_start: list[str] = Field(default_factory=list)

    @field_validator("warm_start", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    # limits on an architecture's costs, e.g. {infer_ms_gpu: "<=5"}: what breaks them is never
    # trained (segtune.config.constraints)
    constraints: dict[str, str] = Field(default_factory=dict)

    def constraint_list(self) -> list[Constraint]:
        """`constraints` read; valid once the sweep is (validate_sweep)."""
        return constraints_of(self.constraints, "tune.constraints")

    def metrics_and_modes(self) -> tuple[list[str], list[str]]:
        """`metric` and `mode` as lists, whether the file wrote one or several."""
        return (
            [self.metric] if isinstance(self.metric, str) else list(self.metric),
            [self.mode] if isinstance(self.mode, str) else list(self.mode),
        )


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
                    taken = {json.dumps(m.get(k, self.train_value(k)), default=str)
                             for m in mappings}  # fmt: skip
                    if len(taken) > 1:
                        keys.append(k)
        return list(dict.fromkeys(keys))

    def train_value(self, key: str) -> Any:
        """A trial key's value where the search space does not set it: `train`'s, else the
        default."""
        if key in self.train:
            return self.train[key]
        field = TrialConfig.model_fields.get(key)
        return field.default if field is not None else None

    def trial_label(self, cfg: TrialConfig) -> str:
        """A trial's run name: the label, the other searched keys (`lr=0.003`), the repeat's seed."""
        return cfg.label(self.searched_keys(), seed=self.tune.repeats > 1)

    def config_label(self, cfg: TrialConfig) -> str:
        """`trial_label` without the seed: the name of the configuration that seeds repeat."""
        return cfg.label(self.searched_keys())

    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) pairs: one for a single objective, several for multi-objective."""
        return list(zip(*self.tune.metrics_and_modes(), strict=False))


def validate_sweep(raw: Mapping[str, Any]) -> SweepConfig:
    """Every problem of a sweep, each with its key path, at once, as one ConfigError."""
    problems: list[str] = []
    sweep: SweepConfig | None = None
    try:
        sweep = SweepConfig.model_validate(dict(raw))
    except ValidationError as exc:
        problems.extend(format_validation_error(exc).splitlines())
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    check_trial_values(train, "train", problems)
    space = raw.get("search_space") if isinstance(raw.get("search_space"), dict) else {}
    for key, spec in space.items():
        check_param(key, spec, f"search_space.{key}", problems)
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
    metrics, modes = tune.metrics_and_modes()
    forms = _forms(sweep.search_space)
    if not metrics:
        problems.append("tune.metric: name the metric to optimise, e.g. val_miou")
    for metric in dict.fromkeys(metrics):
        if metric not in REPORTED_METRICS:
            problems.append(
                f"tune.metric: {metric!r} is not a metric trials report"
                f"{did_you_mean(metric, REPORTED_METRICS)}; one of {', '.join(REPORTED_METRICS)}"
            )
    if len(metrics) != len(modes):
        problems.append(f"tune.mode: {len(modes)} modes for {len(metrics)} metrics")
    if len(metrics) > 1:
        if tune.search != "optuna":
            problems.append(
                "tune.metric: several metrics (multi-objective) need tune.search: optuna"
            )
        if tune.scheduler == "asha":
            problems.append(
                "tune.scheduler: asha stops trials on one metric; use moasha (Pareto ranks) or "
                "fifo with several metrics"
            )
    elif tune.scheduler == "moasha":
        problems.append("tune.scheduler: moasha ranks several metrics; use asha with one")
    if tune.search == "grid" and forms & {"uniform", "loguniform", "randint", "choice"}:
        problems.append(
            "tune.search: grid expands only grid_search; sample uniform/loguniform/randint/choice "
            "with tune.search: random or optuna"
        )
    if tune.search == "optuna" and "grid_search" in forms:
        problems.append("tune.search: optuna cannot take grid_search; use choice instead")
    if tune.search == "optuna" and tune.repeats > 1:
        problems.append("tune.repeats: seeds per configuration need tune.search grid or random")
    if tune.budget is not None and not tune.budget.model_dump(exclude_none=True):
        problems.append("tune.budget: give device_hours or trial_epochs")
    if tune.warm_start and tune.search == "random":
        problems.append("tune.warm_start: needs tune.search grid or optuna")
    epochs = sweep.train_value("epochs")
    halving = tune.scheduler != "fifo"
    if halving and isinstance(epochs, int) and tune.grace_period >= epochs:
        problems.append(
            f"tune.grace_period: {tune.grace_period} must be below train.epochs ({epochs}) for "
            f"{tune.scheduler}"
        )
    # the first metric is judged at every rung; moasha's costs may come with each result
    first = metrics[0] if metrics else ""  # an unknown name is said once, above
    if halving and first in REPORTED_METRICS and first not in EPOCH_SCORES:
        problems.append(f"tune.metric: {tune.scheduler} needs a per-epoch metric, not {first}")
    problems += _check_constraints(sweep)
    return problems + size_problems(sweep.search_space, tune.num_samples, tune.repeats)


def _check_constraints(sweep: SweepConfig) -> list[str]:
    """Each of `tune.constraints` readable, on a cost known before training, and measurable on
    the sweep's nodes: a GPU latency only where trials have a GPU and the bench times it."""
    problems = []
    for key, bound in sweep.tune.constraints.items():
        where = f"tune.constraints.{key}"
        try:
            constraints_of({key: bound}, "tune.constraints")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if key not in MODEL_COSTS:
            problems.append(
                f"{where}: not a cost the cost stage measures before training"
                f"{did_you_mean(key, MODEL_COSTS)}; one of {', '.join(MODEL_COSTS)}"
            )
        elif key == "infer_ms_gpu" and not (sweep.tune.resources_per_trial.gpu and sweep.bench.gpu):
            why, fix = (
                ("bench.gpu is false", "set bench.gpu: true")
                if not sweep.bench.gpu
                else ("tune.resources_per_trial.gpu is 0", "give the trials a GPU")
            )
            problems.append(
                f"{where}: no GPU latency is measured on this sweep's nodes ({why}); constrain "
                f"infer_ms_cpu instead, or {fix}"
            )
    return problems


def load_sweep(path: Path | str, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read, override and validate a sweep file (yaml.safe_load; all problems at once)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a sweep file (e.g. sweeps/quickstart.yaml)")
    if not path.is_file():
        kind = path_kind(path)
        raise ConfigError(
            f"{path}: sweep file not found" if kind == "missing"
            else f"{path}: {kind}, not a sweep file (a YAML file, e.g. sweeps/quickstart.yaml)"
        )  # fmt: skip
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
