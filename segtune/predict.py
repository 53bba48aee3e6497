"""`python -m segtune.predict EXPORT_DIR IMAGE_OR_DIR... --out DIR`: masks from an exported model.

Runs the TorchScript file of a `segtune.export` folder (or its ONNX file with `--onnx`), so no
segtune model code is involved, after checking it against the folder's `SHA256SUMS`. The
preprocessing is the trial's evaluation and large images run in blended tiles
(`segtune.deploy.runtime`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from segtune.cli import check_out_folder, command_parser, run_cli, setup_logging
from segtune.data.dataset import IMAGE_SUFFIXES, read_image
from segtune.deploy.runtime import ExportedModel, Preprocess, overlay, predict_mask
from segtune.errors import ConfigError, DatasetError, SegtuneError

log = logging.getLogger(__name__)

SUFFIXES = (*IMAGE_SUFFIXES, ".tif", ".tiff", ".bmp", ".webp")


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files named on the command line, and the image files of named folders (not recursive).

    A folder's non-image files are skipped with a warning; a named file must be an image.
    """
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.iterdir() if p.is_file()):
                if child.suffix.lower() in SUFFIXES:
                    images.append(child)
                else:
                    log.warning("%s: not an image (%s), skipped", child, ", ".join(SUFFIXES))
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise ConfigError(f"{path}: not an image; expected one of {', '.join(SUFFIXES)}")
            images.append(path)
        else:
            raise ConfigError(f"{path}: no such file or folder")
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise ConfigError(
                f"{stems[image.stem]} and {image} would both write {image.stem}.png; "
                "predict them into different --out folders"
            )
        stems[image.stem] = image
    if not images:
        raise ConfigError(f"no images in {', '.join(str(p) for p in paths)}")
    return images


def _check_tiles(tile: int, overlap: int, multiple: int) -> None:
    if tile < 0 or (tile and tile % multiple):
        raise ConfigError(f"--tile {tile}: use 0 (never tile) or a multiple of {multiple}")
    if tile and not 0 <= overlap < tile // 2:
        raise ConfigError(f"--overlap {overlap}: must be in [0, {tile // 2}) for --tile {tile}")


def _parser() -> argparse.ArgumentParser:
    p = command_parser(
        "python -m segtune.predict",
        "Class-id masks (and overlays) from a folder written by segtune.export.",
    )
    p.add_argument("export_dir", type=Path, help="folder written by python -m segtune.export")
    p.add_argument("inputs", type=Path, nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", type=Path, required=True, help="folder for <stem>.png masks")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the mask colours")
    p.add_argument("--onnx", action="store_true", help="run model.onnx with onnxruntime")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--tile",
        type=int,
        default=1024,
        help="images larger than this on a side run in tiles (multiple of 32; 0: never)",
    )
    p.add_argument("--overlap", type=int, default=128, help="pixels shared by adjacent tiles")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha {args.alpha}: must be in [0, 1]")
    model = ExportedModel.load(args.export_dir, onnx=args.onnx, device=args.device)
    preprocess = Preprocess.from_card(model.card)
    _check_tiles(args.tile, args.overlap, preprocess.multiple)
    images = collect_images(args.inputs)
    check_out_folder(args.out, "--out")  # made only once a mask exists to write
    written, skipped = 0, 0
    for path in tqdm(images, desc="predict", unit="img", disable=None):
        try:
            image = read_image(path, strict=True)  # a JPEG body that decodes into noise, too
        except DatasetError as exc:
            log.warning("%s, skipped", exc)
            skipped += 1
            continue
        mask = predict_mask(model.forward, image, preprocess, args.tile, args.overlap)
        args.out.mkdir(parents=True, exist_ok=True)  # only once a mask exists to write
        Image.fromarray(mask).save(args.out / f"{path.stem}.png")
        if args.overlay:
            Image.fromarray(overlay(image, mask, args.alpha)).save(
                args.out / f"{path.stem}_overlay.png"
            )
        written += 1
    if not written:
        raise SegtuneError(f"no readable image among {len(images)} file(s); nothing written")
    print(
        f"wrote {written} mask(s){' and overlays' if args.overlay else ''} to {args.out} "
        f"({model.runtime} on {model.device}){f'; skipped {skipped} unreadable' if skipped else ''}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
