"""Convert the original FloodNet release into segtune's layout and eight classes.

The real data: FloodNet (M. Rahnemoonfar, T. Chowdhury, A. Sarkar, D. Varshney, M. Yari and
R. Murphy, "FloodNet: A High Resolution Aerial Imagery Dataset for Post Flood Scene
Understanding", IEEE Access 9, 2021) holds UAV images taken after Hurricane Harvey, 4000x3000
px, with pixel labels in 10 classes. The supervised release (FloodNet-Supervised_v1.0, linked
from the authors' GitHub page) is laid out as::

    SRC/train/train-org-img/<id>.jpg   SRC/train/train-label-img/<id>_lab.png
    SRC/val/val-org-img/...            SRC/test/test-org-img/...

The "tiny FloodNet" of the study is a subset of it resized to about 1000x750, with the
flooded and non-flooded buildings and roads merged into the eight classes of docs/design.md. No
dataset can be downloaded on the build machines; with the release at hand, this tool builds it::

    python -m segtune.data.convert_floodnet FloodNet-Supervised_v1.0 data/floodnet --width 1000

``--flooded merge`` (default) maps flooded buildings and roads to building and road;
``--flooded ignore`` marks them 255 so that training neither rewards nor punishes them.
Images are resized with area averaging, masks with nearest neighbour (no invented labels).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from segtune.classes import CLASS_NAMES, IGNORE_INDEX
from segtune.cli import command_parser, run_cli, setup_logging
from segtune.data.dataset import IMAGE_SUFFIXES, SPLITS
from segtune.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

FLOODNET_CLASSES: tuple[str, ...] = (
    "background",
    "building-flooded",
    "building-non-flooded",
    "road-flooded",
    "road-non-flooded",
    "water",
    "tree",
    "vehicle",
    "pool",
    "grass",
)
FLOODED_MODES = ("merge", "ignore")
LABEL_SUFFIX = "_lab.png"
JPEG_QUALITY = 95

Pair = tuple[str, Path, Path]  # id, image, label


def floodnet_lut(flooded: str = "merge") -> np.ndarray:
    """Lookup table from FloodNet label values (0..9) to our class ids (or 255)."""
    if flooded not in FLOODED_MODES:
        raise ConfigError(f"--flooded {flooded!r}: choose one of {', '.join(FLOODED_MODES)}")
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for value, name in enumerate(FLOODNET_CLASSES):
        base, _, state = name.partition("-")  # e.g. "road", "flooded" | "non-flooded" | ""
        if state == "flooded" and flooded == "ignore":
            continue
        lut[value] = CLASS_NAMES.index(base)
    return lut


def find_pairs(src: Path | str) -> dict[str, list[Pair]]:
    """The image/label pairs of every split present in a FloodNet release folder."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(
            f"FloodNet folder {src} does not exist; pass the unpacked FloodNet-Supervised_v1.0"
        )
    pairs: dict[str, list[Pair]] = {}
    for split in SPLITS:
        image_dir = src / split / f"{split}-org-img"
        label_dir = src / split / f"{split}-label-img"
        if not image_dir.is_dir():
            continue
        if not label_dir.is_dir():
            raise DatasetError(f"{label_dir} is missing: the {split} images need their labels")
        labels = {p.name.removesuffix(LABEL_SUFFIX): p for p in label_dir.glob(f"*{LABEL_SUFFIX}")}
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        split_pairs = []
        for image in images:
            label = labels.pop(image.stem, None)
            if label is None:
                raise DatasetError(
                    f"{image}: no label {label_dir / (image.stem + LABEL_SUFFIX)}; "
                    "restore it or remove the image"
                )
            split_pairs.append((image.stem, image, label))
        if labels:
            log.warning(
                "%s: %d labels without an image (e.g. %s) are skipped",
                label_dir,
                len(labels),
                next(iter(labels.values())).name,
            )
        if split_pairs:
            pairs[split] = split_pairs
    if not pairs:
        raise DatasetError(
            f"{src}: no FloodNet split found; expected {src}/<split>/<split>-org-img with "
            f"<split> one of {', '.join(SPLITS)}"
        )
    return pairs


def _read_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            label = np.asarray(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"{path}: unreadable label ({exc}); re-copy the file") from None
    if label.ndim != 2:
        raise DatasetError(f"{path}: label has {label.shape[2]} channels; FloodNet labels have one")
    top = int(label.max(initial=0))
    if top >= len(FLOODNET_CLASSES):
        raise DatasetError(
            f"{path}: label value {top} > {len(FLOODNET_CLASSES) - 1}; FloodNet labels are "
            f"0..{len(FLOODNET_CLASSES) - 1} ({', '.join(FLOODNET_CLASSES)})"
        )
    return label


def convert_pair(
    image_path: Path, label_path: Path, width: int, lut: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One resized RGB image and its mask in our class ids."""
    label = _read_label(label_path)
    try:
        with Image.open(image_path) as img:
            full = img.size
            height = max(1, round(full[1] * width / full[0]))
            # A JPEG decodes straight at 1/2, 1/4 or 1/8 scale (never below the target): 4x faster.
            img.draft("RGB", (width, height))
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"{image_path}: unreadable image ({exc}); re-copy the file") from None
    if label.shape != (full[1], full[0]):
        raise DatasetError(
            f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but {image_path.name} "
            f"is {full[0]}x{full[1]}; they must match"
        )
    image = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(lut[label], (width, height), interpolation=cv2.INTER_NEAREST)
    return image, mask


def convert(
    src: Path | str,
    dst: Path | str,
    width: int = 1000,
    flooded: str = "merge",
    progress: bool = True,
) -> dict[str, int]:
    """Convert every split found under ``src`` into ``dst``; returns the pair count per split."""
    if width < 1:
        raise ConfigError(f"--width {width}: must be a positive number of pixels")
    lut = floodnet_lut(flooded)
    pairs = find_pairs(src)
    dst = Path(dst)
    with tqdm(
        total=sum(map(len, pairs.values())), desc="FloodNet", unit="img", disable=not progress
    ) as bar:
        for split, split_pairs in pairs.items():
            image_dir, mask_dir = dst / split / "image", dst / split / "mask"
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            for sample_id, image_path, label_path in split_pairs:
                image, mask = convert_pair(image_path, label_path, width, lut)
                Image.fromarray(image).save(
                    image_dir / f"{sample_id}.jpg", format="JPEG", quality=JPEG_QUALITY
                )
                Image.fromarray(mask).save(mask_dir / f"{sample_id}.png", format="PNG")
                bar.update()
    counts = {split: len(p) for split, p in pairs.items()}
    log.info("converted %s to %s (width %d, flooded: %s)", counts, dst, width, flooded)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "python -m segtune.data.convert_floodnet",
        "Convert the FloodNet release (10 classes, 4000x3000) to segtune's layout.",
    )
    parser.add_argument("src", type=Path, help="unpacked FloodNet-Supervised_v1.0 folder")
    parser.add_argument("dst", type=Path, help="dataset root to write (ROOT/<split>/image|mask)")
    parser.add_argument("--width", type=int, default=1000, help="output width (default 1000)")
    parser.add_argument(
        "--flooded",
        choices=FLOODED_MODES,
        default="merge",
        help="flooded buildings/roads: merge into building/road, or ignore (255)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    convert(args.src, args.dst, args.width, args.flooded, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
