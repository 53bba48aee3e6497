"""A trial's inputs, the same for `segtune.train` and the Ray trainable: data, loss and model."""

from __future__ import annotations

from torch import nn

from segtune.config.trial import DataConfig, TrialConfig
from segtune.data.pipeline import DataBundle, Scan, build_data
from segtune.models import build_model
from segtune.training.engine import seed_everything
from segtune.training.losses import build_loss, class_weights


def prepare(
    data_cfg: DataConfig, cfg: TrialConfig, progress: bool = True, scan: Scan | None = None
) -> tuple[DataBundle, nn.Module, nn.Module]:
    """One trial's inputs: its data (from the driver's `scan` when it has one), its loss (class
    weights from the training masks) and its model, built after seeding so that the initial
    weights depend on `cfg.seed` alone."""
    data = build_data(data_cfg, cfg, progress, scan)
    loss_fn = build_loss(
        cfg.loss, class_weights=class_weights(data.class_pixels, cfg.class_weights)
    )
    seed_everything(cfg.seed, cfg.deterministic)
    return data, build_model(cfg), loss_fn
