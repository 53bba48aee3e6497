"""Augmentation presets (albumentations) and the evaluation transform.

`none` is the study's no-augmentation setting (a random crop), `basic` the study's augmentation,
`strong` adds scale, brightness/contrast, blur and noise. Geometric padding fills masks with the
ignore index, never class 0, so padded pixels count neither as background nor in the metrics.
"""

from __future__ import annotations

from typing import Literal

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from segtune.classes import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from segtune.errors import ConfigError

PRESETS = ("none", "basic", "strong")
EvalResize = Literal["pad", "resize", "none"]
_PAD = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": IGNORE_INDEX}


def _crop(height: int, width: int) -> list[A.BasicTransform]:
    return [A.RandomCrop(height, width, pad_if_needed=True, **_PAD)]


def _geometric(preset: str, height: int, width: int) -> list[A.BasicTransform]:
    if preset == "none":
        return _crop(height, width)
    ops: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=(height, width), scale=(0.25, 1.0), ratio=(0.75, 4 / 3)),
        A.Rotate(limit=30, p=0.5, **_PAD),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
    ]
    if preset == "strong":
        ops.insert(1, A.Affine(scale=(0.75, 1.25), p=0.5, **_PAD))
    return ops


def _photometric(preset: str) -> list[A.BasicTransform]:
    if preset == "none":
        return []
    ops: list[A.BasicTransform] = [
        A.RGBShift(r_shift_limit=15, g_shift_limit=15, b_shift_limit=15, p=0.5),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=10, p=0.3),
    ]
    if preset == "strong":
        ops += [
            A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.25, p=0.5),
            A.GaussianBlur(blur_limit=(3, 5), p=0.2),
            A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
        ]
    return ops


def _finish(normalize: bool) -> list[A.BasicTransform]:
    if not normalize:
        return []
    return [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def train_transform(
    preset: str,
    image_size: int | tuple[int, int],
    *,
    seed: int | None = None,
    photometric: bool = True,
    normalize: bool = True,
) -> A.Compose:
    """The training pipeline of a preset, cropping to `image_size` (an int, or (height, width)).

    `seed` fixes albumentations' own random state (it ignores numpy's and torch's);
    `photometric=False, normalize=False` leaves only the geometry, which tests use to check
    that image and mask stay aligned.
    """
    if preset not in PRESETS:
        raise ConfigError(f"augment: unknown preset '{preset}'; valid: {', '.join(PRESETS)}")
    height, width = _size(image_size)
    ops = _geometric(preset, height, width)
    if photometric:
        ops += _photometric(preset)
    return A.Compose(ops + _finish(normalize), seed=seed)


def eval_transform(
    resize: EvalResize = "pad", multiple: int = 32, *, normalize: bool = True
) -> A.Compose:
    """The whole image, padded (bottom/right, mask 255) or resized to a multiple of `multiple`."""
    if resize == "pad":
        ops: list[A.BasicTransform] = [
            A.PadIfNeeded(
                min_height=None,
                min_width=None,
                pad_height_divisor=multiple,
                pad_width_divisor=multiple,
                position="top_left",
                **_PAD,
            )
        ]
    elif resize == "resize":
        ops = [ResizeToMultiple(multiple)]
    elif resize == "none":
        ops = []
    else:
        raise ConfigError(f"eval resize '{resize}' unknown; valid: pad, resize, none")
    return A.Compose(ops + _finish(normalize))


class ResizeToMultiple(A.DualTransform):
    """Resize to the nearest multiple of `multiple` on each side (masks: nearest neighbour)."""

    def __init__(self, multiple: int = 32, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.multiple = multiple

    def _target(self, length: int) -> int:
        return max(self.multiple, round(length / self.multiple) * self.multiple)

    def apply(self, img, **params):  # type: ignore[no-untyped-def]
        size = (self._target(img.shape[1]), self._target(img.shape[0]))
        return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask, **params):  # type: ignore[no-untyped-def]
        size = (self._target(mask.shape[1]), self._target(mask.shape[0]))
        return cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("multiple",)
