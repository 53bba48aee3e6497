"""The configuration of one trial: the flat trial keys (docs/design.md), where its data comes
from, image sizes written WxH, and the YAML reading and `--set` overrides every command shares.

No Ray, no MLflow here. The sweep file around these is `segtune.config.sweep`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from segtune.config.names import EPOCH_SCORES
from segtune.errors import ConfigError, problems_message

Arch = Literal["unet", "deeplabv3", "deeplabv3plus"]
Augment = Literal["none", "basic", "strong"]
Amp = Literal["auto", "off", "bf16", "fp16"]


def parse_hw(text: str) -> tuple[int, int]:
    """Parse ``WxH`` as the study writes image sizes (``1000x750``) and return ``(H, W)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if match is None:
        raise ConfigError(
            f"invalid input size {text!r}: write it as WIDTHxHEIGHT, e.g. 1000x750 (the study's size)"
        )
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise ConfigError(f"invalid input size {text!r}: width and height must be at least 1")
    return height, width


# the base URL of a mirror of torchvision's weights files (segtune.models.weights); every node
# gets it (segtune.sweep.ray_init, a cluster's .cluster.env)
WEIGHTS_MIRROR_ENV = "SEGTUNE_WEIGHTS_MIRROR"
WEIGHTS_URL = re.compile(r"(https?://[^#\s]+)#sha256=([0-9a-fA-F]{64})")


def weights_url(pretrained: str) -> tuple[str, str] | None:
    """(URL, sha256) of `pretrained: https://host/w.pth#sha256=HEX`; None for none, imagenet or
    a file. A URL without the sha256 of its file is a ConfigError."""
    if not pretrained.lower().startswith(("http://", "https://")):
        return None
    match = WEIGHTS_URL.fullmatch(pretrained)
    if match is None:
        raise ConfigError(
            f"{pretrained}: a URL needs the sha256 of its file, "
            "written https://host/w.pth#sha256=<64 hex digits> (sha256sum w.pth)"
        )
    return match.group(1), match.group(2).lower()


def format_hw(input_hw: Sequence[int]) -> str:
    """The inverse of `parse_hw`: ``(750, 1000)`` -> ``"1000x750"``."""
    height, width = check_hw(input_hw)
    return f"{width}x{height}"


def check_hw(input_hw: Sequence[int]) -> tuple[int, int]:
    if len(input_hw) != 2 or any(int(v) != v or v < 1 for v in input_hw):
        raise ConfigError(f"invalid input size {tuple(input_hw)!r}: expected (height, width) >= 1")
    return int(input_hw[0]), int(input_hw[1])


class TrialConfig(BaseModel):
    """Everything one trial receives; the keys are the flat trial keys of docs/design.md.

    Its fields are the one statement of what a trial key takes: the sweep file's search space
    is checked against them too (segtune.config.sweep), bounds and choices alike."""

    # no key means anything by inf or nan, and a sampler given one fails inside Ray
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    LABEL_KEYS: ClassVar[tuple[str, ...]] = ("arch", "backbone", "aspp", "augment")

    # model
    arch: Arch = "unet"
    backbone: str = "none"
    aspp: bool = True
    pretrained: str = "none"  # none | imagenet | a path | https://host/w.pth#sha256=HEX
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
    amp: Amp = "auto"
    seed: int = 0
    deterministic: bool = False
    num_workers: int = Field(0, ge=0)
    select_metric: str = "val_miou"

    @field_validator("backbone", "pretrained")
    @classmethod
    def _strip(cls, value: str) -> str:
        return str(value).strip()

    @field_validator("pretrained")
    @classmethod
    def _url_with_hash(cls, value: str) -> str:
        """A URL's file is checked against its sha256 before it is used, like torchvision's."""
        try:
            weights_url(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false (and `on` as true): take them as meant."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("select_metric")
    @classmethod
    def _epoch_score(cls, value: str) -> str:
        """engine.fit picks the best epoch by this score of each epoch: any other name would
        fail every trial at the end of its first epoch."""
        if value not in EPOCH_SCORES:
            raise ValueError(f"{value!r} is not a score of each epoch: use one of "
                             f"{', '.join(EPOCH_SCORES)}")  # fmt: skip
        return value

    def model_label(self) -> str:
        """The network alone: `deeplabv3-mobilenet_v3_small-aspp`, `unet-none`."""
        parts = [self.arch, self.backbone]
        if self.arch != "unet":
            parts.append("aspp" if self.aspp else "noaspp")
        return "-".join(parts)

    def label(self, keys: Sequence[str] = (), seed: bool = False) -> str:
        """A readable run name: `deeplabv3-mobilenet_v3_small-aspp-basic`, then `key=value` for
        each of `keys` that the name does not already hold, then `s<seed>` when `seed`."""
        parts = [self.model_label(), self.augment]
        for key in dict.fromkeys(keys):
            if key in (*self.LABEL_KEYS, "seed"):
                continue
            value = getattr(self, key)
            parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
        if seed:
            parts.append(f"s{self.seed}")
        return "-".join(parts)


def _check_size(value: str) -> str:
    try:
        parse_hw(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return value


SizeText = Annotated[str, AfterValidator(_check_size)]  # a WIDTHxHEIGHT size, checked


class SyntheticSpec(BaseModel):
    """A synthetic set to generate at `data.root` on first use (python -m segtune.data.synthetic)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: int = Field(100, ge=1)
    test: int = Field(25, ge=1)
    val: int = Field(0, ge=0)
    size: SizeText = "128x96"
    seed: int = 0
    zoom: float = Field(1.0, ge=0.25, le=16)


class DataConfig(BaseModel):
    """Where a trial's images come from and how they are split and held."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str = "data/tiny-floodnet"
    synthetic: SyntheticSpec | None = None
    # auto: ROOT/val when present, else ROOT/test (the study validated on its test split);
    # "val" or "test" name a split; a number in (0, 1) holds out that share of train.
    val_split: Literal["auto", "val", "test"] | float = "auto"
    # one decoded copy per node, mapped by every trial (segtune.data.cache); a node-local folder,
    # default /dev/shm when it has room, else the temp dir
    cache: bool = True
    cache_dir: str | None = None
    rgb_masks: bool = False
    eval_resize: Literal["pad", "resize", "none"] = "pad"


# how pydantic names the member of a union type it tried, in an error's location
UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
KEY_ERRORS = ("extra_forbidden", "missing")  # their location ends with a key the user wrote


def _union_tags(err: Mapping[str, Any]) -> list[int]:
    """Where the error's location names a member of a union type, not a key."""
    loc = err["loc"]
    keys_end = len(loc) - 1 if err["type"] in KEY_ERRORS else len(loc)
    return [
        i
        for i, part in enumerate(loc[:keys_end])
        if isinstance(part, str) and (any(c in part for c in "[]'(") or part in UNION_TAGS)
    ]


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming its key path; a value that no member of a union type
    accepts (`mode: max | [max, min]`) is one problem, with what each member wanted."""
    errors = exc.errors()
    tags = [_union_tags(e) for e in errors]
    # a member that got inside the value (a list, for [max, up]) is the member meant: the
    # others' complaints about the value's shape are dropped
    inside = {
        e["loc"][: t[0]]
        for e, t in zip(errors, tags, strict=True)
        if t and t[-1] < len(e["loc"]) - 1
    }
    problems: dict[tuple[str, int], list[str]] = {}  # the members of one union share a line
    for n, (err, at) in enumerate(zip(errors, tags, strict=True)):
        loc = err["loc"]
        if at and at[-1] == len(loc) - 1 and loc[: at[0]] in inside:
            continue
        parts = (prefix, *(p for i, p in enumerate(loc) if i not in at))
        path = ".".join(str(p) for p in parts if p != "") or "<root>"
        said = problems.setdefault((path, -1 if at else n), [])
        if err["msg"] not in said:
            said.append(err["msg"])
    return "\n".join(
        f"{path}: {first}" + "".join(f" (or: {m[0].lower()}{m[1:]})" for m in more)
        for (path, _), (first, *more) in problems.items()
    )


def trial_config(values: Mapping[str, Any] | TrialConfig) -> TrialConfig:
    """Validate a mapping of trial keys; every problem is reported at once as a ConfigError."""
    if isinstance(values, TrialConfig):
        return values
    try:
        return TrialConfig.model_validate(dict(values))
    except ValidationError as exc:
        problems = format_validation_error(exc).splitlines()
        raise ConfigError(problems_message("invalid trial configuration", problems)) from None


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
        try:
            node[keys[-1]] = parse_yaml(value)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", "") or exc).split("\n")[0]
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({problem}); quote it as a string "
                "or complete it, e.g. --set train.lr=0.001"
            ) from None
    return result
