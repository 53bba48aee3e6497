"""Confusion-matrix metrics of semantic segmentation: mIoU, pixel and class accuracy, IoU per class.

Pixels are counted with `torch.bincount` on the device the predictions live on, so evaluating a
split costs no host transfer per batch; only the tiny C x C (or N x C x C) counts reach the CPU,
where the float64 ratios are taken.

mIoU convention (a documented decision, the same for a split and for one image): the IoU of a
class is tp / (tp + fp + fn). A class absent from both the prediction and the ground truth has
no IoU (NaN) and is left out of the mean; a class absent from the ground truth but predicted has
IoU 0 and counts. mIoU is therefore the mean over the classes with tp + fp + fn > 0, and NaN when
there is none (every pixel ignored). Mean class accuracy is the mean recall over the classes that
have ground-truth pixels. Pixels whose ground truth is the ignore index count nowhere.

Boundary mIoU (Task 4: does a decoder fix boundaries?) is the same mIoU over the band of pixels
within BOUNDARY_PX of a ground-truth class boundary only: the confusion of the band.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from segtune.classes import CLASS_NAMES, IGNORE_INDEX, iou_per_class, nanmean


def _as_predictions(logits_or_preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class ids shaped like `target`: logits N x C x H x W are reduced by argmax over C."""
    if logits_or_preds.is_floating_point() and logits_or_preds.dim() == target.dim() + 1:
        logits_or_preds = logits_or_preds.argmax(1)
    if logits_or_preds.shape != target.shape:
        raise ValueError(
            f"predictions of shape {tuple(logits_or_preds.shape)} do not match targets of shape "
            f"{tuple(target.shape)}: pass logits N x C x H x W or class ids N x H x W"
        )
    return logits_or_preds.long()


def _pixel_codes(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """`target * C + pred` per pixel; C * C for ignored pixels, C * C + 1 for class ids outside
    0..C-1 (INVALID_BIN).

    Sentinel bins instead of boolean indexing or a check keep the shape static and the device
    busy: nothing here waits for the GPU. Callers check the invalid bin when they read counts.
    """
    target = target.long()
    ignored = target == ignore_index
    invalid = (target < 0) | (target >= num_classes) | (preds < 0) | (preds >= num_classes)
    codes = (target * num_classes + preds).masked_fill_(ignored, num_classes * num_classes)
    return codes.masked_fill_(invalid & ~ignored, num_classes * num_classes + 1)


def _invalid_ids(num_classes: int, ignore_index: int, pixels: int) -> ValueError:
    return ValueError(
        f"{pixels} pixels have class ids outside 0..{num_classes - 1} "
        f"(ignore index {ignore_index}) in the targets or predictions"
    )


class ConfusionMatrix:
    """Pixel counts over a whole split (rows = ground truth, cols = prediction) and their scores.

    The int64 matrix stays on `device` (the model's), updated batch by batch; see the module
    docstring for the mIoU convention.
    """

    def __init__(
        self,
        class_names: Sequence[str] = CLASS_NAMES,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str | None = None,
    ) -> None:
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._matrix = torch.zeros(
            self.num_classes, self.num_classes, dtype=torch.int64, device=self.device
        )
        self._invalid = torch.zeros((), dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, logits_or_preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: logits N x C x H x W (argmax taken) or class ids N x H x W, and targets."""
        target = target.to(self.device)
        preds = _as_predictions(logits_or_preds.to(self.device), target)
        codes = _pixel_codes(preds, target, self.num_classes, self.ignore_index)
        n = self.num_classes * self.num_classes
        counts = torch.bincount(codes.flatten(), minlength=n + 2)
        self._matrix += counts[:n].view(self.num_classes, self.num_classes)
        self._invalid += counts[n + 1]

    def reset(self) -> None:
        self._matrix.zero_()
        self._invalid.zero_()

    @property
    def matrix(self) -> torch.Tensor:
        """The accumulated counts, C x C int64 on the device (a view: do not modify)."""
        return self._matrix

    def to_numpy(self) -> np.ndarray:
        return self._matrix.cpu().numpy()

    def to_dataframe(self) -> pd.DataFrame:
        """The matrix with class names on both axes, as written to eval/confusion.csv."""
        return pd.DataFrame(
            self.to_numpy(),
            index=pd.Index(self.class_names, name="true"),
            columns=pd.Index(self.class_names, name="predicted"),
        )

    def compute(self) -> dict[str, float]:
        """`miou`, `acc`, `class_acc` and `iou_<class name>`; NaN where nothing defines them.

        Raises ValueError if any update held class ids outside 0..C-1 (checked here, once,
        rather than with a GPU sync per batch).
        """
        if int(self._invalid):
            raise _invalid_ids(self.num_classes, self.ignore_index, int(self._invalid))
        m = self.to_numpy().astype(np.float64)
        iou = iou_per_class(m)
        tp = np.diagonal(m)
        truth = m.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(truth > 0, tp / truth, np.nan)
        acc = tp.sum() / m.sum() if m.sum() > 0 else float("nan")
        scores = {
            "miou": float(nanmean(iou)),
            "acc": float(acc),
            "class_acc": float(nanmean(recall)),
        }
        scores.update(
            {f"iou_{name}": float(v) for name, v in zip(self.class_names, iou, strict=True)}
        )
        return scores


BOUNDARY_PX = 3  # the band around class boundaries: pixels at most this far from another class


@torch.no_grad()
def boundary_band(
    target: torch.Tensor, width: int = BOUNDARY_PX, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Pixels of `target` (N x H x W class ids) within `width` pixels (a square window, the
    chessboard distance) of a pixel of another class; ignored pixels separate nothing."""
    if width < 1:
        raise ValueError(f"boundary band width {width}: must be at least 1 pixel")
    labels = target.long()[:, None].float()
    ignored = labels == ignore_index
    size = 2 * width + 1
    # the largest and the smallest class in each window, ignored pixels left out of both
    high = torch.nn.functional.max_pool2d(labels.masked_fill(ignored, -1), size, 1, width)
    low = -torch.nn.functional.max_pool2d(-labels.masked_fill(ignored, 1e9), size, 1, width)
    return ((high != low) & (high >= 0) & ~ignored)[:, 0]


def band_target(
    target: torch.Tensor, width: int = BOUNDARY_PX, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """`target` with every pixel outside the boundary band ignored: a ConfusionMatrix updated
    with it counts the band only, so its mIoU is the boundary mIoU."""
    band = boundary_band(target, width, ignore_index)
    return target.masked_fill(~band, ignore_index)


@torch.no_grad()
def per_image_rows(
    preds: torch.Tensor,
    targets: torch.Tensor,
    ids: Sequence[str],
    class_names: Sequence[str] = CLASS_NAMES,
    ignore_index: int = IGNORE_INDEX,
) -> list[dict[str, str | float]]:
    """One row per image (`id`, `miou`, `iou_<class name>`) with the split's mIoU convention.

    All images are counted at once: each image's pixel codes are offset by its index times C * C,
    so one bincount on the device yields N confusion matrices. `preds` may be logits or ids.
    """
    targets = targets.to(preds.device)
    preds = _as_predictions(preds, targets)
    if len(ids) != targets.shape[0]:
        raise ValueError(f"{len(ids)} ids for a batch of {targets.shape[0]} images")
    c = len(class_names)
    n_images = targets.shape[0]
    codes = _pixel_codes(preds, targets, c, ignore_index).flatten(1)
    if invalid := int((codes == c * c + 1).sum()):
        raise _invalid_ids(c, ignore_index, invalid)
    ignored = codes == c * c
    offsets = torch.arange(n_images, device=codes.device)[:, None] * (c * c)
    codes = (codes + offsets).masked_fill_(ignored, n_images * c * c)
    counts = torch.bincount(codes.flatten(), minlength=n_images * c * c + 1)
    iou = iou_per_class(counts[:-1].view(n_images, c, c).cpu().numpy())
    miou = nanmean(iou)
    rows: list[dict[str, str | float]] = []
    for i, sample_id in enumerate(ids):
        row: dict[str, str | float] = {"id": sample_id, "miou": float(miou[i])}
        row.update({f"iou_{name}": float(v) for name, v in zip(class_names, iou[i], strict=True)})
        rows.append(row)
    return rows
