"""`python -m segtune.predict EXPORT_DIR IMAGE_OR_DIR... --out DIR`: masks from an exported model.

Runs the TorchScript file of a `segtune.export` folder (or its ONNX file with `--onnx`), so no
segtune model code is involved, after checking it against the folder's `SHA256SUMS`. The
preprocessing is the trial's evaluation and large images run in blended tiles
(`segtune.deploy.runtime`).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from segtune.cli import check_out_folder, command_parser, run_cli, setup_logging
from segtune.data.dataset import IMAGE_SUFFIXES, read_image
from segtune.deploy.runtime import ExportedModel, Preprocess, overlay, predict_mask
from segtune.errors import ConfigError, DatasetError, SegtuneError
from segtune.paths import atomic_write, path_kind

log = logging.getLogger(__name__)

SUFFIXES = (*IMAGE_SUFFIXES, ".tif", ".tiff", ".bmp", ".webp")


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files named on the command line, and the image files of named folders (not recursive).

    A folder's non-image files are skipped with a warning; a named file must be an image. A
    device or a pipe is named as such: reading one never ends or reads nothing.
    """
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.iterdir() if not p.is_dir()):
                if not child.is_file():
                    log.warning("%s: %s, not an image file; skipped", child, path_kind(child))
                elif child.suffix.lower() in SUFFIXES:
                    images.append(child)
                else:
                    log.warning("%s: not an image (%s), skipped", child, ", ".join(SUFFIXES))
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise ConfigError(f"{path}: not an image; expected one of {', '.join(SUFFIXES)}")
            images.append(path)
        elif os.path.lexists(path):
            raise ConfigError(f"{path}: {path_kind(path)}, not an image file")
        else:
            raise ConfigError(f"{path}: no such file or folder")
    if not images:
        raise ConfigError(f"no images in {', '.join(str(p) for p in paths)}")
    return images


@dataclass(frozen=True)
class Output:
    """The files one input image writes."""

    image: Path
    mask: Path
    overlay: Path | None

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.mask,) if self.overlay is None else (self.mask, self.overlay)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def plan_outputs(
    images: Sequence[Path], inputs: Sequence[Path], out: Path, overlay: bool
) -> list[Output]:
    """Every file predict will write, checked before any work: no output is an input (by
    identity, so symlinks, `..`, hard links and a case-insensitive filesystem count), --out is
    no input folder, and no two outputs are one file. Names that differ only in case count as
    one: --out may lie on a case-insensitive filesystem. An existing mask or overlay (an earlier
    predict's) is replaced; anything other than a file there is refused."""
    outputs = [
        Output(i, out / f"{i.stem}.png", out / f"{i.stem}_overlay.png" if overlay else None)
        for i in images
    ]
    if out.is_dir():
        for folder in inputs:
            if folder.is_dir() and os.path.samefile(folder, out):
                raise ConfigError(
                    f"--out {out}: is the input folder {folder}; masks would mix with (and "
                    "overwrite) the images there: choose another --out"
                )
    sources = {_identity(i): i for i in images}
    claims: dict[str, tuple[Output, Path]] = {}  # case-folded name -> first writer
    collisions: list[str] = []
    for output in outputs:
        for target in output.files:
            if os.path.lexists(target):
                if target.exists() and _identity(target) in sources:
                    raise ConfigError(
                        f"--out {out}: {target} is the input {sources[_identity(target)]}; "
                        "predict never writes over an input: choose another --out"
                    )
                if not target.is_file():
                    raise ConfigError(
                        f"--out {out}: {target} is {path_kind(target)}, not a mask file; "
                        "move it or choose another --out"
                    )
            first, other = claims.setdefault(target.name.casefold(), (output, target))
            if first is output:
                continue
            names = target.name if other == target else f"{other.name} and {target.name}"
            if first.image == output.image:
                collisions.append(f"{output.image} is named twice (it would write {names} twice)")
            else:
                collisions.append(f"{first.image} and {output.image} would both write {names}")
    if collisions:
        more = f" (and {len(collisions) - 1} more)" if len(collisions) > 1 else ""
        fix = (
            "name it once"
            if "named twice" in collisions[0]
            else "rename one, or predict them into different --out folders"
        )
        raise ConfigError(f"{collisions[0]}{more}; {fix}")
    return outputs


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
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for <stem>.png masks (no input folder; an earlier predict's masks there are "
        "replaced, an input never)",
    )
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
    images = collect_images(args.inputs)
    check_out_folder(args.out, "--out")  # made only once a mask exists to write
    outputs = plan_outputs(images, args.inputs, args.out, args.overlay)
    model = ExportedModel.load(args.export_dir, onnx=args.onnx, device=args.device)
    preprocess = Preprocess.from_card(model.card)
    _check_tiles(args.tile, args.overlap, preprocess.multiple)
    masks, overlays, skipped = 0, 0, 0
    for output in tqdm(outputs, desc="predict", unit="img", disable=None):
        try:
            image = read_image(output.image, strict=True)  # a JPEG body decoding into noise too
        except DatasetError as exc:
            log.warning("%s, skipped", exc)
            skipped += 1
            continue
        mask = predict_mask(model.forward, image, preprocess, args.tile, args.overlap)
        try:
            args.out.mkdir(parents=True, exist_ok=True)  # only once a mask exists to write
            _save_png(mask, output.mask)
            masks += 1
            if output.overlay is not None:
                _save_png(overlay(image, mask, args.alpha), output.overlay)
                overlays += 1
        except OSError as exc:  # a full disk: say what was written before
            raise SegtuneError(
                f"--out {args.out}: cannot write ({exc}); {masks} mask(s) and {overlays} "
                "overlay(s) written before, each whole"
            ) from None
    if not masks:
        raise SegtuneError(f"no readable image among {len(images)} file(s); nothing written")
    print(
        f"wrote {masks} mask(s){f' and {overlays} overlay(s)' if args.overlay else ''} to "
        f"{args.out} ({model.runtime} on {model.device})"
        f"{f'; skipped {skipped} unreadable' if skipped else ''}"
    )
    return 0


def _save_png(array: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
