"""Data layer: FloodNet-layout dataset, augmentation presets, loaders, synthetic data."""

from segtune.data.dataset import (
    Sample,
    SegmentationDataset,
    available_splits,
    holdout,
    read_image,
    read_mask,
    scan_split,
)
from segtune.data.loader import EpochSampler, make_loader, set_epoch
from segtune.data.transforms import PRESETS, eval_transform, train_transform

__all__ = [
    "PRESETS",
    "Sample",
    "SegmentationDataset",
    "available_splits",
    "EpochSampler",
    "eval_transform",
    "holdout",
    "make_loader",
    "read_image",
    "read_mask",
    "scan_split",
    "set_epoch",
    "train_transform",
]
