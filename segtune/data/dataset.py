"""The FloodNet-layout dataset: pairs found by id, checked up front, optionally read from the
node's decoded copy (`segtune.data.cache`).

Layout (docs/design.md): ``ROOT/<split>/image/<id>.jpg|png`` and ``ROOT/<split>/mask/<id>.png``.
Every problem a user can cause is found when the dataset is built and raised as a
`DatasetError` that names the file and the fix, so that a sweep fails before its first trial
rather than in the middle of epoch 7.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from segtune.classes import IGNORE_INDEX, NUM_CLASSES, rgb_to_mask
from segtune.errors import DatasetError
from segtune.paths import path_kind

if TYPE_CHECKING:
    from segtune.data.cache import DecodedSplit

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# the first bytes of each format: a file whose suffix lies (a text file named .jpg) is named as such
SIGNATURES = {".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".png": b"\x89PNG\r\n\x1a\n"}
# more pixels than this is a decompression bomb or a mistake (FloodNet's originals: 12 MP)
MAX_PIXELS = 100_000_000
UNREADABLE = (UnidentifiedImageError, OSError, Image.DecompressionBombError)
SPLITS = ("train", "val", "test")
_VALID_MASK_VALUES = np.zeros(256, dtype=bool)
_VALID_MASK_VALUES[:NUM_CLASSES] = True
_VALID_MASK_VALUES[IGNORE_INDEX] = True


@dataclass(frozen=True)
class Sample:
    """One image/mask pair of a split."""

    id: str
    image_path: Path
    mask_path: Path
    width: int
    height: int
    class_pixels: tuple[int, ...] = ()  # pixels per class id, counted by the check


def _files_by_id(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes:
            continue
        if path.is_symlink() and not path.exists():
            raise DatasetError(
                f"{path}: a symlink that leads to no file (broken, or a loop); fix or remove it"
            )
        if path.is_file():
            found[path.stem] = path
        elif not path.is_dir():  # a device or a pipe: reading it never ends, or reads nothing
            raise DatasetError(
                f"{path}: {path_kind(path)}, not an image or mask file; replace it with the "
                "file or remove it"
            )
    return found


def _check_complete(path: Path) -> None:
    """Cheap format and truncation check: the file starts with its format's signature, and a
    JPEG ends with its EOI marker, a PNG with its IEND chunk."""
    size = path.stat().st_size
    if size == 0:
        raise DatasetError(f"{path}: empty file; replace it or remove the pair")
    suffix = path.suffix.lower()
    with path.open("rb") as f:
        head = f.read(8)
        f.seek(max(0, size - 12))
        tail = f.read()
    if not head.startswith(SIGNATURES[suffix]):
        kind = "PNG" if suffix == ".png" else "JPEG"
        raise DatasetError(
            f"{path}: not a {kind} file (it starts with {head!r}); replace it with the real "
            "image or remove the pair"
        )
    if suffix in (".jpg", ".jpeg") and not tail.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise DatasetError(f"{path}: truncated JPEG (no end-of-image marker); re-copy the file")
    if suffix == ".png" and b"IEND" not in tail:
        raise DatasetError(f"{path}: truncated PNG (no IEND chunk); re-copy the file")


def _check_pixels(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise DatasetError(
            f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the limit "
            f"of {MAX_PIXELS / 1e6:.0f}; downscale or tile it first"
        )


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height from the header alone, so a check of thousands of images stays fast."""
    try:
        with Image.open(path) as img:
            _check_pixels(path, img.size)
            return img.size
    except UNREADABLE as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> DatasetError:
    return DatasetError(f"{path}: unreadable image ({exc}); replace it or remove the pair")


def _to_rgb8(path: Path, values: np.ndarray) -> np.ndarray:
    """A 16-bit (or 32-bit integer holding 16-bit) image scaled to 8 bits, never clipped."""
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DatasetError(
            f"{path}: integer image with values outside 0..65535; save it as 8-bit RGB"
        )
    scaled = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(scaled[..., None], 3, axis=-1) if scaled.ndim == 2 else scaled


def read_image(path: Path | str, strict: bool = False) -> np.ndarray:
    """Decode an image as RGB uint8 (H, W, 3); 16-bit images are scaled down to 8 bits.
    `strict` (the pre-flight, predict): a JPEG decoded with libjpeg's warnings taken as
    errors, as a body of other bytes behind an intact header decodes too, into noise, with
    only a warning ("premature end of data segment", "extraneous bytes before marker") that
    Pillow never shows."""
    path = Path(path)
    if strict and path.suffix.lower() in (".jpg", ".jpeg"):
        data = path.read_bytes()
        try:
            height, width, colours, _ = simplejpeg.decode_jpeg_header(data)
            _check_pixels(path, (width, height))
            if colours not in ("CMYK", "YCCK"):  # libjpeg-turbo turns no CMYK into RGB
                return simplejpeg.decode_jpeg(data, "RGB", strict=True)
            simplejpeg.decode_jpeg(data, "CMYK", strict=True)  # checked; Pillow converts it
        except ValueError as exc:
            raise DatasetError(
                f"{path}: corrupt JPEG ({exc}); re-save or replace it, or remove the pair"
            ) from None
    try:
        with Image.open(path) as img:
            _check_pixels(path, img.size)
            if img.mode.startswith("I"):  # 16- or 32-bit integers: convert("RGB") would clip
                return _to_rgb8(path, np.asarray(img))
            if img.mode == "F":
                raise DatasetError(f"{path}: floating-point image; save it as 8-bit RGB")
            return np.asarray(img.convert("RGB"))
    except UNREADABLE as exc:
        raise _unreadable(path, exc) from None


def read_mask(path: Path | str, rgb_masks: bool = False) -> np.ndarray:
    """Decode a mask as class ids uint8 (H, W); RGB palette masks only when `rgb_masks` is set."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            _check_pixels(path, img.size)
            if img.mode in ("RGB", "RGBA"):
                if not rgb_masks:
                    raise DatasetError(
                        f"{path}: mask is {img.mode}, expected single-channel class ids; "
                        "convert it, or set data.rgb_masks: true to map the palette colours "
                        "of docs/design.md to class ids"
                    )
                return rgb_to_mask(np.asarray(img.convert("RGB")))
            if img.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(
                    f"{path}: mask mode {img.mode} unsupported; save it as 8-bit 'L'"
                )
            mask = np.asarray(img)
    except UNREADABLE as exc:
        raise DatasetError(
            f"{path}: unreadable mask ({exc}); replace it or remove the pair"
        ) from None
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise DatasetError(
                f"{path}: mask values outside 0..255; expected class ids 0..7 or 255"
            )
        mask = mask.astype(np.uint8)
    return mask


def decode_pair(sample: Sample, rgb_masks: bool) -> tuple[np.ndarray, np.ndarray]:
    """The pair's uint8 image (H, W, 3) and class-id mask (H, W)."""
    return read_image(sample.image_path), read_mask(sample.mask_path, rgb_masks)


def _check_pair(sample: Sample, rgb_masks: bool) -> Sample:
    """Decode the image fully (a corrupt body behind an intact header and end marker fails
    here, not in a trial), check the mask's size and values; return the sample with its class
    pixel counts."""
    read_image(sample.image_path, strict=True)
    mask = read_mask(sample.mask_path, rgb_masks)
    if mask.shape != (sample.height, sample.width):
        raise DatasetError(
            f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
            f"{sample.image_path.name} is {sample.width}x{sample.height}; they must match"
        )
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = (counts > 0) & ~_VALID_MASK_VALUES
    if bad.any():
        values = np.flatnonzero(bad)[:8].tolist()
        raise DatasetError(
            f"{sample.mask_path}: mask values {values} outside the class ids 0..{NUM_CLASSES - 1} "
            f"and the ignore index {IGNORE_INDEX}; remap them (FloodNet originals: "
            "python -m segtune.data.convert_floodnet)"
        )
    return replace(sample, class_pixels=tuple(counts[:NUM_CLASSES].tolist()))


def scan_split(
    root: Path | str,
    split: str,
    *,
    rgb_masks: bool = False,
    progress: bool = True,
) -> list[Sample]:
    """Find and check the pairs of one split; raise `DatasetError` on the first problem found.

    Images and masks are decoded once, in one threaded pass: every image must decode whole, and
    every mask match its image's size and hold class ids.
    """
    root = _existing_root(root)
    image_dir, mask_dir = root / split / "image", root / split / "mask"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DatasetError(
                f"{folder} is missing; expected ROOT/{split}/image and ROOT/{split}/mask"
            )
    images = _files_by_id(image_dir, IMAGE_SUFFIXES)
    masks = _files_by_id(mask_dir, (".png",))
    for missing_mask in sorted(images.keys() - masks.keys())[:1]:
        raise DatasetError(
            f"{images[missing_mask]}: image has no mask {mask_dir / (missing_mask + '.png')}; "
            "add the mask or remove the image"
        )
    for missing_image in sorted(masks.keys() - images.keys())[:1]:
        raise DatasetError(
            f"{masks[missing_image]}: mask has no image {missing_image}.jpg/.png in {image_dir}; "
            "add the image or remove the mask"
        )
    if not images:
        raise DatasetError(f"{image_dir}: split '{split}' is empty; add image/mask pairs")

    samples = []
    for sample_id, image_path in images.items():
        _check_complete(image_path)
        _check_complete(masks[sample_id])
        width, height = _image_size(image_path)
        samples.append(Sample(sample_id, image_path, masks[sample_id], width, height))

    with ThreadPoolExecutor(max_workers=4) as pool:
        checks = pool.map(lambda s: _check_pair(s, rgb_masks), samples)
        samples = list(
            tqdm(
                checks,
                total=len(samples),
                desc=f"checking {split} pairs",
                disable=not progress,
                leave=False,
            )
        )
    log.info("%s/%s: %d image/mask pairs checked", root, split, len(samples))
    return samples


def _existing_root(root: Path | str) -> Path:
    root = Path(root)
    if os.path.lexists(root) and not root.is_dir():
        raise DatasetError(
            f"dataset root {root} is {path_kind(root)}; point data.root at the dataset's folder"
        )
    if not root.is_dir():
        raise DatasetError(
            f"dataset root {root} does not exist; point data.root at a folder with "
            "train/image and train/mask, or generate one with python -m segtune.data.synthetic"
        )
    return root


def fingerprint(root: Path | str, with_times: bool = False) -> str:
    """`<files>:<hash>` over every split's file names and sizes: two copies of a dataset on two
    machines agree on it without reading the images. `with_times` adds each file's modification
    time, for what stays on one node (its decoded cache): a file edited in place, at its old
    size, then makes a new key instead of reading stale pixels."""
    root = _existing_root(root)
    digest, count = hashlib.sha256(), 0
    for split in SPLITS:
        for sub in ("image", "mask"):
            folder = root / split / sub
            if not folder.is_dir():
                continue
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                stat = path.stat()
                when = f":{stat.st_mtime_ns}" if with_times else ""
                digest.update(f"{split}/{sub}/{path.name}:{stat.st_size}{when}\n".encode())
                count += 1
    return f"{count}:{digest.hexdigest()[:16]}"


def image_sizes(root: Path | str, split: str) -> list[tuple[int, int]]:
    """(width, height) of every image of a split, from the headers alone."""
    folder = _existing_root(root) / split / "image"
    return [_image_size(path) for path in _files_by_id(folder, IMAGE_SUFFIXES).values()]


def available_splits(root: Path | str) -> list[str]:
    """The splits of docs/design.md that exist under `root` (a DatasetError if it does not)."""
    root = _existing_root(root)
    return [s for s in SPLITS if (root / s / "image").is_dir()]


def holdout(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split samples into (kept, held out) at random but reproducibly, for a validation set."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"validation fraction {fraction} must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(samples))
    n_held = max(1, round(len(samples) * fraction))
    if n_held >= len(samples):
        raise DatasetError(f"cannot hold out {fraction:.0%} of {len(samples)} samples and keep any")
    held = set(order[:n_held].tolist())
    return (
        [s for i, s in enumerate(samples) if i not in held],
        [s for i, s in enumerate(samples) if i in held],
    )


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/mask pairs through an albumentations transform, as `{"image", "mask", "id"}`.

    With a `cache` (the node's decoded copy of the samples' split), pairs are read from its
    read-only map, so no epoch decodes and no process holds a copy of its own; without one,
    each pair is decoded from its files when it is read.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[..., dict[str, Any]] | None = None,
        *,
        cache: DecodedSplit | None = None,
        rgb_masks: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.rgb_masks = rgb_masks
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded uint8 image and mask, before any transform (read-only from a cache)."""
        sample = self.samples[index]
        if self.cache is not None:
            return self.cache.pair(sample.id)
        return decode_pair(sample, self.rgb_masks)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """`key` is an index, or `(index, augmentation seed)` as `EpochSampler` yields."""
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load(index)
        if self.transform is not None:
            if aug_seed is not None and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(aug_seed)
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not isinstance(mask, torch.Tensor):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        # uint8 (255 fits): 8x less to collate, pin and copy than int64; widened on the device
        return {"image": image, "mask": mask, "id": self.samples[index].id}
