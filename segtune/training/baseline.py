"""`python -m segtune.training.baseline ROOT`: the colour-only floor that trained models must beat.

Each pixel is given the class whose mean training colour is nearest. A dataset on which this
scores well can be solved without looking at shapes or context, and tells nothing about models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from segtune.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from segtune.cli import command_parser, run_cli, setup_logging
from segtune.data.dataset import Sample, SegmentationDataset, scan_split
from segtune.training.metrics import ConfusionMatrix


def class_mean_colours(dataset: SegmentationDataset) -> np.ndarray:
    """Mean RGB of each class over a dataset's pixels (NaN for a class never seen)."""
    sums = np.zeros((NUM_CLASSES, 3))
    counts = np.zeros(NUM_CLASSES)
    for i in range(len(dataset)):
        image, mask = dataset.load(i)
        labels = mask.ravel()
        keep = labels != IGNORE_INDEX
        pixels = image.reshape(-1, 3)[keep].astype(np.float64)
        for channel in range(3):
            sums[:, channel] += np.bincount(labels[keep], pixels[:, channel], NUM_CLASSES)
        counts += np.bincount(labels[keep], minlength=NUM_CLASSES)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def colour_floor(
    train: Sequence[Sample], val: Sequence[Sample], rgb_masks: bool = False
) -> dict[str, float]:
    """Metrics of the nearest-class-mean-colour classifier fitted on `train`, scored on `val`:
    the floor a sweep computes once for its own validation split (`floor_miou`)."""
    means = class_mean_colours(SegmentationDataset(train, rgb_masks=rgb_masks))
    present = ~np.isnan(means).any(1)
    test = SegmentationDataset(val, rgb_masks=rgb_masks)
    matrix = ConfusionMatrix()
    for i in range(len(test)):
        image, mask = test.load(i)
        dist = (
            (image[..., None, :].astype(np.float32) - means[present].astype(np.float32)) ** 2
        ).sum(-1)
        prediction = np.flatnonzero(present)[dist.argmin(-1)]
        matrix.update(
            torch.from_numpy(prediction)[None], torch.from_numpy(mask.astype(np.int64))[None]
        )
    return matrix.compute()


def colour_baseline(root: Path | str, eval_split: str = "test") -> dict[str, float]:
    """The colour floor of a dataset on disk: fitted on its train split, scored on `eval_split`."""
    return colour_floor(
        scan_split(root, "train", progress=False), scan_split(root, eval_split, progress=False)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("python -m segtune.training.baseline", __doc__)
    parser.add_argument("root", help="dataset root (ROOT/<split>/image|mask)")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    scores = colour_baseline(args.root, args.split)
    print(
        f"colour-only baseline on {args.root}/{args.split}: mIoU {scores['miou']:.4f}, "
        f"pixel accuracy {scores['acc']:.4f}"
    )
    for name in CLASS_NAMES:
        print(f"  IoU {name:<10} {scores[f'iou_{name}']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
