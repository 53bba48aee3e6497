"""Segmentation losses (cross-entropy, soft dice, focal, their sum) and class weights from masks.

Every loss takes logits N x C x H x W and targets N x H x W, skips pixels labelled with the
ignore index, and returns a scalar. A batch without any usable pixel (all ignored, or only
classes of weight 0) gives a loss of 0 with a zero gradient instead of PyTorch's 0/0 = NaN, which
the training loop would take for divergence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segtune.classes import IGNORE_INDEX
from segtune.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

LOSS_NAMES: tuple[str, ...] = ("ce", "dice", "focal", "ce_dice")
WEIGHT_MODES: tuple[str, ...] = ("none", "inverse", "median")


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 (with a zero gradient) where num and den are both 0."""
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32: sums over millions of pixels overflow float16."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class _PixelLoss(nn.Module):
    """Holds the optional class weights (a buffer, so `.to(device)` moves them) and ignore index."""

    weight: torch.Tensor | None

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, weighted={self.weight is not None}"

    def _class_weight(self, logits: torch.Tensor) -> torch.Tensor:
        """Weights C, all ones when the loss is unweighted, in the logits' dtype."""
        num_classes = logits.shape[1]
        if self.weight is None:
            return logits.new_ones(num_classes)
        if self.weight.numel() != num_classes:
            raise ValueError(f"{self.weight.numel()} class weights for {num_classes} classes")
        return self.weight.to(logits.dtype)

    def _split_target(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid pixel mask, target with ignored pixels set to class 0 so it can index)."""
        target = target.long()
        valid = target != self.ignore_index
        return valid, target.masked_fill(~valid, 0)

    def _pixel_weight(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weight of each pixel's true class, 0 at ignored pixels (N x H x W)."""
        valid, safe = self._split_target(target)
        return self._class_weight(logits)[safe] * valid


class CrossEntropyLoss(_PixelLoss):
    """Cross-entropy averaged like `F.cross_entropy(weight, ignore_index)`: sum(w_t * nll) / sum(w_t)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = _upcast(logits)
        weight = None if self.weight is None else self._class_weight(logits)
        total = F.cross_entropy(
            logits, target.long(), weight=weight, ignore_index=self.ignore_index, reduction="sum"
        )
        return _safe_div(total, self._pixel_weight(logits, target).sum())


class FocalLoss(_PixelLoss):
    """Focal loss -alpha_t (1 - p_t)^gamma log p_t (Lin et al. 2017), alpha = the class weights.

    Normalised by the sum of alpha_t over the labelled pixels, so gamma = 0 is exactly the
    (weighted) cross-entropy above.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__(weight, ignore_index)
        self.gamma = gamma

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, {super().extra_repr()}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = _upcast(logits)
        _, safe = self._split_target(target)
        log_p = F.log_softmax(logits, 1).gather(1, safe[:, None])[:, 0]
        pixel_w = self._pixel_weight(logits, target)
        per_pixel = -((1 - log_p.exp()) ** self.gamma) * log_p
        return _safe_div((per_pixel * pixel_w).sum(), pixel_w.sum())


class DiceLoss(_PixelLoss):
    """Soft multi-class dice, 1 - mean_c 2 sum(p_c y_c) / (sum p_c + sum y_c), over the batch.

    Sums run over every labelled pixel of the batch (ignored pixels are masked out of numerator
    and denominator alike). The mean runs over the classes present in the batch's labelled target,
    weighted by the class weights when given: the dice of an absent class is 0 when predicted and
    undefined when not, so including it would let absent classes dominate a small batch. Their
    false positives are still penalised, since softmax mass given to them is taken from the
    present classes' overlap. No smoothing term is needed as present classes have a denominator
    of at least 1; a batch without labelled pixels gives 0.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = _upcast(logits)
        valid, safe = self._split_target(target)
        classes = torch.arange(logits.shape[1], device=logits.device)[None, :, None, None]
        truth = ((safe[:, None] == classes) & valid[:, None]).to(logits.dtype)
        probs = F.softmax(logits, 1) * valid[:, None]
        dims = (0, 2, 3)
        true_pixels = truth.sum(dims)
        dice = _safe_div(2 * (probs * truth).sum(dims), probs.sum(dims) + true_pixels)
        class_w = self._class_weight(logits) * (true_pixels > 0)
        return _safe_div((class_w * (1 - dice)).sum(), class_w.sum())


class CEDiceLoss(nn.Module):
    """Cross-entropy plus dice, both weighted alike: CE for pixels, dice for region overlap."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ce = CrossEntropyLoss(weight, ignore_index)
        self.dice = DiceLoss(weight, ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, target) + self.dice(logits, target)


def build_loss(
    name: str,
    class_weights: torch.Tensor | Sequence[float] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> nn.Module:
    """The loss `name` (one of LOSS_NAMES), with optional per-class weights (1-D, >= 0)."""
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=torch.float32).detach().clone()
        if weight.dim() != 1 or not bool(torch.isfinite(weight).all() and (weight >= 0).all()):
            raise ValueError(f"class weights must be a 1-D finite tensor >= 0, got {weight}")
    if name == "ce":
        return CrossEntropyLoss(weight, ignore_index)
    if name == "dice":
        return DiceLoss(weight, ignore_index)
    if name == "focal":
        return FocalLoss(weight=weight, ignore_index=ignore_index)
    if name == "ce_dice":
        return CEDiceLoss(weight, ignore_index)
    raise ConfigError(f"loss: unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")


def class_weights(freqs: Sequence[float] | np.ndarray, mode: str) -> torch.Tensor | None:
    """Per-class loss weights from pixel frequencies (counts or fractions; only ratios matter).

    `none`: no weights. `inverse`: 1 / freq, scaled so the mean over present classes is 1.
    `median`: median frequency balancing (Eigen & Fergus 2015), median(freq) / freq, the median
    taken over present classes. In both modes a class with no training pixel gets weight 0: its
    true pixels never occur in training, and a finite weight for it would be arbitrary.
    """
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"class_weights: unknown mode {mode!r}; valid: {', '.join(WEIGHT_MODES)}")
    if mode == "none":
        return None
    f = np.asarray(freqs, dtype=np.float64)
    if f.ndim != 1 or not np.isfinite(f).all() or (f < 0).any():
        raise ValueError(f"class frequencies must be a 1-D finite array >= 0, got {f}")
    present = f > 0
    if not present.any():
        raise DatasetError(
            f"class_weights: {mode} needs labelled training pixels, but every training pixel is "
            "the ignore index; fix the training masks or set class_weights: none"
        )
    f = f / f.sum()
    weights = np.zeros_like(f)
    if mode == "inverse":
        weights[present] = 1.0 / f[present]
        weights /= weights[present].mean()
    else:
        weights[present] = np.median(f[present]) / f[present]
    log.info("class weights (%s): %s", mode, np.array2string(weights, precision=3))
    return torch.tensor(weights, dtype=torch.float32)
