"""Configuration schemas: the flat trial configuration of DESIGN.md and the sweep file.

No Ray, no MLflow here: a sweep file is checked completely before anything starts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from segtune.errors import ConfigError

Arch = Literal["unet", "deeplabv3", "deeplabv3plus"]
Augment = Literal["none", "basic", "strong"]


def parse_hw(text: str) -> tuple[int, int]:
    """Parse ``WxH`` as the seed writes image sizes (``1000x750``) and return ``(H, W)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if match is None:
        raise ConfigError(
            f"invalid input size {text!r}: write it as WIDTHxHEIGHT, e.g. 1000x750 (the seed's size)"
        )
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise ConfigError(f"invalid input size {text!r}: width and height must be at least 1")
    return height, width


def format_hw(input_hw: Sequence[int]) -> str:
    """The inverse of `parse_hw`: ``(750, 1000)`` -> ``"1000x750"``."""
    height, width = check_hw(input_hw)
    return f"{width}x{height}"


def check_hw(input_hw: Sequence[int]) -> tuple[int, int]:
    if len(input_hw) != 2 or any(int(v) != v or v < 1 for v in input_hw):
        raise ConfigError(f"invalid input size {tuple(input_hw)!r}: expected (height, width) >= 1")
    return int(input_hw[0]), int(input_hw[1])


class TrialConfig(BaseModel):
    """Everything one trial receives; the keys are the flat trial keys of DESIGN.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # model
    arch: Arch = "unet"
    backbone: str = "none"
    aspp: bool = True
    pretrained: str = "none"  # none | imagenet | a path to a state dict
    aspp_rates: tuple[int, int, int] = (12, 24, 36)
    output_stride: Literal[8, 16, 32] = 16
    unet_min_channels: int = Field(32, ge=1)
    unet_max_channels: int = Field(512, ge=1)
    unet_depth: int = Field(4, ge=1, le=6)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # data
    augment: Augment = "basic"
    image_size: int = Field(256, ge=32)
    eval_multiple: int = Field(32, ge=1)
    # optimisation
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(10, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    scheduler: Literal["none", "poly", "cosine", "onecycle"] = "poly"
    warmup_epochs: float = Field(0.0, ge=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    loss: Literal["ce", "dice", "focal", "ce_dice"] = "ce"
    class_weights: Literal["none", "inverse", "median"] = "none"
    grad_clip: float = Field(0.0, ge=0.0)  # 0 disables clipping
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    seed: int = 0
    deterministic: bool = False
    num_workers: int = Field(0, ge=0)
    select_metric: str = "val_miou"

    @field_validator("backbone", "pretrained")
    @classmethod
    def _strip(cls, value: str) -> str:
        return str(value).strip()

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false (and `on` as true): take them as meant."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    def label(self) -> str:
        """A readable run name such as `deeplabv3-mobilenet_v3_small-aspp-basic`."""
        parts = [self.arch, self.backbone]
        if self.arch != "unet":
            parts.append("aspp" if self.aspp else "noaspp")
        parts.append(self.augment)
        return "-".join(parts)


class SyntheticSpec(BaseModel):
    """A synthetic set to generate at `data.root` on first use (python -m segtune.data.synthetic)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        try:
            parse_hw(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    train: int = Field(100, ge=1)
    test: int = Field(25, ge=1)
    val: int = Field(0, ge=0)
    size: str = "128x96"
    seed: int = 0
    zoom: float = Field(1.0, ge=0.25, le=16)


class DataConfig(BaseModel):
    """Where a trial's images come from and how they are split and held."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str = "data/tiny-floodnet"
    synthetic: SyntheticSpec | None = None
    # auto: ROOT/val when present, else ROOT/test (the seed validated on its test split);
    # "val" or "test" name a split; a number in (0, 1) holds out that share of train.
    val_split: Literal["auto", "val", "test"] | float = "auto"
    cache: bool = True
    rgb_masks: bool = False
    eval_resize: Literal["pad", "resize", "none"] = "pad"


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming its key path."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        lines.append(f"{path or '<root>'}: {err['msg']}")
    return "\n".join(lines)


def trial_config(values: Mapping[str, Any] | TrialConfig) -> TrialConfig:
    """Validate a mapping of trial keys; every problem is reported at once as a ConfigError."""
    if isinstance(values, TrialConfig):
        return values
    try:
        return TrialConfig.model_validate(dict(values))
    except ValidationError as exc:
        raise ConfigError("invalid trial configuration:\n" + format_validation_error(exc)) from None


# --- the sweep file ------------------------------------------------------------------------

SEARCH_FORMS = ("grid_search", "choice", "uniform", "loguniform", "randint")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`; people write `1e-4`)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load` semantics (no objects are ever built), with `1e-4` as a float."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


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
    storage_path: str = "runs"


class MlflowSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str | None = None
    experiment: str | None = None  # defaults to the sweep's name


class BenchSection(BaseModel):
    """The cost benchmark each trial runs on its best checkpoint (DESIGN.md, cost measurement)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = "1000x750"
    threads: int = Field(2, ge=1)
    repeats: int = Field(5, ge=1)
    warmup: int = Field(2, ge=0)
    gpu: bool = True


class SweepConfig(BaseModel):
    """A whole sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    data: DataConfig = DataConfig()
    train: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, Any] = Field(default_factory=dict)
    tune: TuneSection = TuneSection()
    mlflow: MlflowSection = MlflowSection()
    bench: BenchSection = BenchSection()

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) pairs: one for a single objective, several for multi-objective."""
        metrics = [self.tune.metric] if isinstance(self.tune.metric, str) else self.tune.metric
        modes = [self.tune.mode] if isinstance(self.tune.mode, str) else self.tune.mode
        return list(zip(metrics, modes, strict=False))


def apply_overrides(raw: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML, so they keep their types."""
    result = copy.deepcopy(raw)
    for item in assignments:
        path, sep, value = item.partition("=")
        keys = [k for k in path.strip().split(".") if k]
        if not sep or not keys:
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.lr=3e-4")
        node = result
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {key} is not a section")
            node = child
        node[keys[-1]] = parse_yaml(value)
    return result


_TRIAL_FIELDS = TrialConfig.model_fields


def _check_trial_values(values: Mapping[str, Any], where: str, problems: list[str]) -> None:
    """Type-check trial keys against TrialConfig, one problem line per key."""
    try:
        TrialConfig.model_validate(dict(values))
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, where).splitlines())


def _check_param(key: str, spec: Any, where: str, problems: list[str]) -> None:
    """One search-space entry: a scalar or one of SEARCH_FORMS over valid values."""
    if not isinstance(spec, dict):
        _check_trial_values({key: spec}, where.rsplit(".", 1)[0], problems)
        return
    if len(spec) != 1 or next(iter(spec)) not in SEARCH_FORMS:
        problems.append(f"{where}: expected a value or one of {', '.join(SEARCH_FORMS)}")
        return
    form, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        problems.append(f"{where}.{form}: expected a non-empty list")
        return
    if form in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
            problems.append(f"{where}.{form}: expected [low, high]")
            return
        if values[0] >= values[1] or (form == "loguniform" and values[0] <= 0):
            problems.append(
                f"{where}.{form}: need 0 < low < high"
                if form == "loguniform"
                else f"{where}.{form}: need low < high"
            )
            return
    for i, value in enumerate(values):
        if isinstance(value, dict) and key not in _TRIAL_FIELDS:
            unknown = sorted(set(value) - set(_TRIAL_FIELDS))
            if unknown:
                problems.append(f"{where}.{form}[{i}]: unknown trial keys {unknown}")
            _check_trial_values(
                {k: v for k, v in value.items() if k in _TRIAL_FIELDS},
                f"{where}.{form}[{i}]",
                problems,
            )
        elif key not in _TRIAL_FIELDS:
            problems.append(
                f"{where}: '{key}' is not a trial key; a group key must hold a list of mappings "
                f"of trial keys (valid trial keys: {', '.join(_TRIAL_FIELDS)})"
            )
            return
        else:
            try:
                TrialConfig.model_validate({key: value})
            except ValidationError as exc:
                problems.append(f"{where}.{form}[{i}]: {exc.errors()[0]['msg']}")


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
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(dict.fromkeys(problems)))
    assert sweep is not None
    return sweep


def _forms(space: Mapping[str, Any]) -> set[str]:
    return {next(iter(v)) for v in space.values() if isinstance(v, dict) and len(v) == 1}


def _check_tune(sweep: SweepConfig) -> list[str]:
    tune, problems = sweep.tune, []
    metrics = [tune.metric] if isinstance(tune.metric, str) else tune.metric
    modes = [tune.mode] if isinstance(tune.mode, str) else tune.mode
    forms = _forms(sweep.search_space)
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
    if tune.scheduler == "asha" and metrics[0] not in (
        "val_miou",
        "val_loss",
        "val_acc",
        "train_loss",
    ):
        problems.append(f"tune.metric: asha needs a per-epoch metric, not {metrics[0]}")
    return problems


def load_sweep(path: Path | str, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read, override and validate a sweep file (yaml.safe_load; all problems at once)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    try:
        raw = parse_yaml(path.read_text()) or {}
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
