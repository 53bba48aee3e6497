"""The tiny-FloodNet class table of docs/design.md: names, palette, ignore index, colour
conversions, and how a class is scored (IoU from a confusion matrix, the NaN-skipping mean) in
numpy alone, so that the report reads logged confusion matrices without importing torch."""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "building",
    "road",
    "water",
    "tree",
    "vehicle",
    "pool",
    "grass",
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255

PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (0, 0, 255),
    (0, 255, 0),
    (0, 255, 255),
    (255, 0, 0),
    (255, 0, 255),
    (255, 255, 0),
    (255, 255, 255),
)
IGNORE_COLOR: tuple[int, int, int] = (128, 128, 128)

# ImageNet statistics: every torchvision backbone was pretrained with them.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class-id mask (H, W) to an RGB uint8 image (H, W, 3); ignored pixels are grey."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    lut[IGNORE_INDEX] = IGNORE_COLOR
    return lut[np.asarray(mask, dtype=np.uint8)]


def rgb_to_mask(rgb: np.ndarray) -> np.ndarray:
    """Palette-coloured RGB mask (H, W, 3) to class ids; colours not in the palette become 255."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    code = (
        (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    )
    mask = np.full(rgb.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    for class_id, (r, g, b) in enumerate(PALETTE):
        mask[code == ((r << 16) | (g << 8) | b)] = class_id
    return mask


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """IoU of each class from confusion matrices (..., C, C), rows = truth; NaN where undefined."""
    m = np.asarray(matrix, dtype=np.float64)  # read only, so pandas' read-only arrays do too
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    union = m.sum(-1) + m.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis skipping NaN; NaN (without numpy's warning) where all are NaN."""
    defined = ~np.isnan(values)
    count = defined.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(defined, values, 0.0).sum(-1) / count, np.nan)
