"""The `best.pt` format (docs/design.md): weights plus everything needed to use them elsewhere.

A plain dict of tensors, strings and numbers, so that it loads with
`torch.load(..., weights_only=True)` and never runs pickled code. `load_dict` is the one safe
way this project reads any weights file: checkpoints, training states, pretrained weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from segtune.classes import CLASS_NAMES, IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, PALETTE
from segtune.config.trial import TrialConfig
from segtune.errors import ModelError
from segtune.paths import atomic_write

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "config", "class_names", "palette", "mean", "std", "metrics")


def atomic_save(obj: Any, path: Path | str) -> Path:
    """torch.save to a temporary file and rename, so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def best_checkpoint(
    state_dict: Mapping[str, torch.Tensor], cfg: TrialConfig, metrics: Mapping[str, float]
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in state_dict.items()},
        "config": cfg.model_dump(mode="json"),
        "class_names": list(CLASS_NAMES),
        "palette": [list(c) for c in PALETTE],
        "ignore_index": IGNORE_INDEX,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def load_dict(
    path: Path | str, what: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """A dict of tensors (a state dict, a checkpoint) read with `weights_only=True`; `what`
    names the file's role in the errors, e.g. `pretrained` or `checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what}: no file {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors have many types; all mean "not our file"
        raise ModelError(f"{what}: {path} is not a loadable weights file ({exc})") from None
    if not isinstance(state, Mapping):
        raise ModelError(f"{what}: {path} holds a {type(state).__name__}, not a dict of weights")
    return dict(state)


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a `best.pt` safely (weights_only) and check that it is one."""
    ckpt = load_dict(path, "checkpoint", map_location)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ModelError(f"{path}: not a segtune best.pt (missing {', '.join(missing)})")
    return ckpt
