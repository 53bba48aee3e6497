"""What the driver settles before any trial: every local path absolute, and the checks that
would fail every trial (dataset, pretrained weights, a GPU asked of a machine without one), run
in a thread while Ray starts, with the driver's heavy imports and the colour-only floor."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from segtune.config.sweep import SweepConfig
from segtune.config.trial import weights_url
from segtune.errors import ConfigError, ModelError, problems_message
from segtune.sweep.storage import RunStorage

if TYPE_CHECKING:  # the heavy modules load in the pre-flight's thread (PREFLIGHT_IMPORTS)
    from segtune.data.pipeline import Scan


def absolute_paths(sweep: SweepConfig, tracking_uri: str) -> tuple[SweepConfig, str]:
    """Trials run in Ray's own working directories: make every local path absolute (a storage
    URI stays as it is)."""
    paths = {"root": sweep.data.root, "cache_dir": sweep.data.cache_dir}
    data = sweep.data.model_copy(
        update={key: str(Path(path).resolve()) for key, path in paths.items() if path}
    )
    storage = RunStorage.of(sweep.tune.storage_path, sweep.tune.storage_endpoint)
    tune = sweep.tune.model_copy(update={"storage_path": storage.location})
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        tracking_uri = "sqlite:///" + str(Path(tracking_uri[len("sqlite:///") :]).resolve())
    return sweep.model_copy(update={"data": data, "tune": tune}), tracking_uri


def needed_weights(sweep: SweepConfig) -> list[tuple[str, str]]:
    """(pretrained, backbone) of every download the sweep's trials need: torchvision's file of
    each backbone in the search space with `pretrained: imagenet`, each `URL#sha256=` once."""
    from segtune.sweep.space import discrete_trials

    needed = {
        (cfg.pretrained, cfg.backbone if cfg.pretrained == "imagenet" else ""): None
        for cfg in discrete_trials(sweep)
        if cfg.pretrained == "imagenet" or weights_url(cfg.pretrained)
    }
    return list(needed)


def fetch_weights(needed: Sequence[tuple[str, str]]) -> None:
    """Every download the sweep needs, into this machine's hub cache; the first that fails
    is one line (the others would most likely fail the same way)."""
    from segtune.models import pretrained_file

    for pretrained, backbone in needed:
        pretrained_file(pretrained, backbone)


def preflight(sweep: SweepConfig, local: bool) -> Scan:
    """Fail before any trial on what would fail every trial; returns the checked dataset, which
    every trial then reads instead of checking it again. On this machine alone (`local`) the
    pretrained weights are downloaded and the data cache's room checked here; on a cluster, by
    each node's check (node_checks)."""
    from segtune.data.pipeline import cache_room, scan_dataset
    from segtune.sweep.space import check_combinations, discrete_trials

    check_combinations(sweep)
    files = {cfg.pretrained for cfg in discrete_trials(sweep)} - {"none", "imagenet"}
    missing = [
        f"pretrained: {file} (no such file)"
        for file in sorted(files)
        if not weights_url(file) and not Path(file).is_file()
    ]
    if missing:
        head = "pretrained weights missing (run with --set train.pretrained=none)"
        raise ModelError(problems_message(head, missing))
    gpu = sweep.tune.resources_per_trial.gpu
    if local and gpu > 0:
        import torch

        if torch.cuda.device_count() == 0:
            raise ConfigError(
                f"tune.resources_per_trial.gpu: {gpu} asked, but this machine has no GPU; "
                "set it to 0 (--set tune.resources_per_trial.gpu=0) or join a GPU cluster "
                "with --address"
            )
    if local:
        fetch_weights(needed_weights(sweep))
    scan = scan_dataset(sweep.data, progress=True)  # generates a synthetic set, checks every pair
    room = cache_room(sweep.data, scan) if local else None  # nodes of a cluster: node_checks
    if room:
        raise ConfigError(room)
    return scan


# what the driver imports while Ray starts: the pre-flight's modules, the Tuner and the trainable,
# and MLflow's SQL store (1.2 s, else at the cost stage's first look-up)
PREFLIGHT_IMPORTS = (
    "segtune.training.baseline",
    "segtune.data.pipeline",
    "segtune.models",
    "segtune.sweep.space",
    "segtune.sweep.driver",
    "mlflow.store.tracking.sqlalchemy_store",
)


def checked_while_ray_starts(sweep: SweepConfig, local: bool) -> tuple[Scan, float]:
    """The pre-flight with the driver's heavy imports (PREFLIGHT_IMPORTS), run in a thread while
    Ray starts: the checked dataset and its colour-only floor."""
    for name in PREFLIGHT_IMPORTS:
        importlib.import_module(name)
    from segtune.data.pipeline import split_samples
    from segtune.training.baseline import colour_floor

    scan = preflight(sweep, local)
    train, val, _ = split_samples(sweep.data, int(sweep.train_value("seed")), scan=scan)
    floor = colour_floor(train, val, sweep.data.rgb_masks)["miou"]
    return scan, floor
