"""Helpers for tests: small image/mask pairs in the docs/design.md layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_pair(
    root: Path, split: str, sample_id: str, image: np.ndarray, mask: np.ndarray, ext: str = ".jpg"
) -> tuple[Path, Path]:
    """Write one image/mask pair in the docs/design.md layout."""
    (root / split / "image").mkdir(parents=True, exist_ok=True)
    (root / split / "mask").mkdir(parents=True, exist_ok=True)
    image_path = root / split / "image" / f"{sample_id}{ext}"
    mask_path = root / split / "mask" / f"{sample_id}.png"
    Image.fromarray(image).save(image_path, quality=95)
    Image.fromarray(mask).save(mask_path)
    return image_path, mask_path


def random_pair(
    rng: np.random.Generator, height: int = 48, width: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    return (
        rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        rng.integers(0, 8, (height, width), dtype=np.uint8),
    )
