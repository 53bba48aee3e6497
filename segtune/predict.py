"""`python -m segtune.predict EXPORT_DIR IMAGE_OR_DIR... --out DIR`: masks from an exported model.

Runs the TorchScript file of a `segtune.export` folder (or its ONNX file with `--onnx`), so no
segtune model code is involved. Preprocessing is the trial's evaluation, read from the export's
`model_card.json`: the geometry of `eval_transform` (pad bottom/right to a multiple of 32 with
black, by default) and the card's normalisation; the prediction is cropped back to the image.
Images larger than `--tile` on a side are cut into overlapping tiles whose softmax outputs are
averaged with a window that fades out over the overlap, so tile seams do not show.

This module also owns the export folder's integrity check: every file is listed in
`SHA256SUMS`, and nothing is loaded before its checksum matches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from segtune.cli import run_cli, setup_logging
from segtune.data.classes import colorize
from segtune.data.dataset import IMAGE_SUFFIXES, read_image
from segtune.data.transforms import eval_transform
from segtune.errors import ConfigError, DatasetError, ModelError, SegtuneError

log = logging.getLogger(__name__)

# --- the export folder (written by segtune.export) ------------------------------------------

CARD_FILE = "model_card.json"
TORCHSCRIPT_FILE = "model.pt"
ONNX_FILE = "model.onnx"
CHECKPOINT_FILE = "best.pt"
README_FILE = "README.md"
CHECKSUMS_FILE = "SHA256SUMS"
CARD_FORMAT = 1

# torch 2.14 marks TorchScript deprecated on every save and load; it still is the format that
# runs without Python model code
JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"
Forward = Callable[[torch.Tensor], torch.Tensor]  # N x 3 x H x W normalised -> N x C x H x W


class IntegrityError(ModelError):
    """An exported file does not match SHA256SUMS: modified, truncated or replaced."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path, names: Iterable[str]) -> Path:
    """`SHA256SUMS` over `names`, in the format `sha256sum -c SHA256SUMS` checks."""
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in sorted(names)]
    path = folder / CHECKSUMS_FILE
    path.write_text("".join(lines))
    return path


def read_checksums(folder: Path) -> dict[str, str]:
    path = folder / CHECKSUMS_FILE
    if not path.is_file():
        raise IntegrityError(
            f"{path}: missing; an export folder lists the checksum of every file there. "
            "Re-export with python -m segtune.export"
        )
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().lstrip("*")  # `sha256sum -b` marks binary mode with '*'
        if len(digest) != 64 or not name:
            raise IntegrityError(f"{path}:{number}: not a 'SHA256  FILE' line: {line!r}")
        sums[name] = digest.lower()
    return sums


def verify_files(folder: Path, names: Iterable[str]) -> None:
    """Refuse any of `names` that is missing, unlisted, or whose SHA-256 differs from SHA256SUMS."""
    sums = read_checksums(folder)
    for name in names:
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{path}: missing from the export folder; re-export it")
        if name not in sums:
            raise IntegrityError(
                f"{path}: not listed in {folder / CHECKSUMS_FILE}; refusing to load an "
                "unverified file"
            )
        if sha256_file(path) != sums[name]:
            raise IntegrityError(
                f"{path}: SHA-256 does not match {folder / CHECKSUMS_FILE}; the file was "
                "modified after export (tampered or corrupted). Refusing to load it: re-export "
                "or restore the folder"
            )


def load_card(folder: Path) -> dict[str, Any]:
    """The verified `model_card.json` of an export folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not an export folder (python -m segtune.export writes one)")
    verify_files(folder, [CARD_FILE])
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{folder / CARD_FILE}: not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ModelError(
            f"{folder / CARD_FILE}: model card format {card.get('format')!r} unknown "
            f"(this segtune reads format {CARD_FORMAT})"
        )
    return card


# --- the model -------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
            "use --device cpu or auto"
        )
    return torch.device(name)


def _onnx_providers(device: torch.device, requested: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda" or requested == "auto":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if requested == "cuda":
            raise ConfigError(
                "--device cuda --onnx: this onnxruntime has no CUDAExecutionProvider "
                f"(providers: {', '.join(available)}); install onnxruntime-gpu or use --device cpu"
            )
    return ["CPUExecutionProvider"]


@dataclass
class ExportedModel:
    """A verified export folder ready to run: its card and a forward function."""

    folder: Path
    card: dict[str, Any]
    runtime: str  # torchscript | onnx
    device: torch.device
    forward: Forward

    @classmethod
    def load(cls, folder: Path | str, onnx: bool = False, device: str = "auto") -> ExportedModel:
        """Verify the card and the model file against SHA256SUMS, then load the model file."""
        folder = Path(folder)
        card = load_card(folder)
        name = card["files"].get("onnx" if onnx else "torchscript")
        if not name:
            instead = "drop --onnx" if onnx else "add --onnx"
            raise ConfigError(
                f"{folder}: exported without {'ONNX' if onnx else 'TorchScript'}; "
                f"{instead}, or re-export with --format torchscript,onnx"
            )
        verify_files(folder, [name])
        torch_device = resolve_device(device)
        if onnx:
            forward, torch_device = _onnx_forward(folder / name, torch_device, device)
        else:
            forward = _torchscript_forward(folder / name, torch_device)
        runtime = "onnx" if onnx else "torchscript"
        log.info("loaded %s (%s on %s)", folder / name, runtime, torch_device)
        return cls(folder, card, runtime, torch_device, forward)


def _torchscript_forward(path: Path, device: torch.device) -> Forward:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=JIT_DEPRECATION)
            module = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as exc:
        raise ModelError(f"{path}: not a loadable TorchScript file ({exc})") from None

    @torch.inference_mode()
    def forward(batch: torch.Tensor) -> torch.Tensor:
        return module(batch.to(device)).float().cpu()

    return forward


def _onnx_forward(path: Path, device: torch.device, requested: str) -> tuple[Forward, torch.device]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            "--onnx needs onnxruntime: pip install 'segtune[export]' (or onnxruntime-gpu)"
        ) from None
    providers = _onnx_providers(device, requested)
    session = ort.InferenceSession(str(path), providers=providers)
    input_name = session.get_inputs()[0].name

    def forward(batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {input_name: array})[0])

    # onnxruntime falls back to the CPU when its CUDA provider cannot start: report what runs
    used = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    return forward, torch.device(used)


# --- preprocessing, tiles, blending ----------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """The trial's evaluation input: `eval_transform` geometry, then (x - mean) / std on [0, 255]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "pad"  # pad | resize | none, as data.eval_resize
    multiple: int = 32

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Preprocess:
        spec = card["input"]
        return cls(tuple(spec["mean"]), tuple(spec["std"]), spec["resize"], int(spec["multiple"]))

    def geometry(self) -> A.Compose:
        return eval_transform(self.resize, self.multiple, normalize=False)

    def tensor(self, image: np.ndarray, geometry: A.Compose) -> torch.Tensor:
        """uint8 H x W x 3 to the float32 1 x 3 x H' x W' the network saw in evaluation.

        Same arithmetic as albumentations' Normalize: (x - 255 mean) / (255 std).
        """
        x = torch.from_numpy(np.ascontiguousarray(geometry(image=image)["image"]))
        x = x.permute(2, 0, 1).float()
        mean = torch.tensor(self.mean).view(3, 1, 1) * 255.0
        scale = 1.0 / (torch.tensor(self.std).view(3, 1, 1) * 255.0)
        return ((x - mean) * scale)[None]

    def restore(self, logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Network output (C x H' x W') back to the window's own size."""
        if self.resize == "resize":
            return F.interpolate(
                logits[None], size=(height, width), mode="bilinear", align_corners=False
            )[0]
        return logits[:, :height, :width]  # pad: crop the bottom/right padding away


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering `length`; the last tile ends flush with the image."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return [*starts, length - tile]


def blend_window(height: int, width: int, overlap: int) -> torch.Tensor:
    """H x W weights: 1 inside, a linear ramp towards each edge over `overlap` pixels.

    The ramp never reaches 0, so a pixel covered by one tile only (an image border) keeps its
    value once the weighted sum is divided by the summed weights.
    """

    def ramp(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32)
        return (torch.minimum(i + 1, n - i) / (overlap + 1)).clamp(max=1.0)

    return ramp(height)[:, None] * ramp(width)[None, :]


def predict_scores(
    forward: Forward,
    image: np.ndarray,
    preprocess: Preprocess,
    tile: int = 0,
    overlap: int = 0,
) -> torch.Tensor:
    """C x H x W scores of one uint8 image: logits of the whole image (as in evaluation), or
    for an image larger than `tile` on a side the window-weighted mean of tile softmaxes."""
    height, width = image.shape[:2]
    geometry = preprocess.geometry()

    def window(y: int, x: int, h: int, w: int) -> torch.Tensor:
        batch = preprocess.tensor(np.ascontiguousarray(image[y : y + h, x : x + w]), geometry)
        return preprocess.restore(forward(batch)[0], h, w)

    if tile <= 0 or (height <= tile and width <= tile):
        return window(0, 0, height, width)
    h, w = min(tile, height), min(tile, width)
    weight = blend_window(h, w, overlap)
    total: torch.Tensor | None = None  # C x H x W, allocated once C is known
    weights = torch.zeros(height, width)
    for y in tile_starts(height, tile, overlap):
        for x in tile_starts(width, tile, overlap):
            probs = window(y, x, h, w).softmax(0)
            if total is None:
                total = torch.zeros(probs.shape[0], height, width)
            total[:, y : y + h, x : x + w] += probs * weight
            weights[y : y + h, x : x + w] += weight
    assert total is not None  # tile_starts always yields a tile
    return total / weights


def predict_mask(
    forward: Forward, image: np.ndarray, preprocess: Preprocess, tile: int = 0, overlap: int = 0
) -> np.ndarray:
    """Class ids (H x W uint8) of one image."""
    scores = predict_scores(forward, image, preprocess, tile, overlap)
    return scores.argmax(0).numpy().astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image blended with the palette colours of its mask."""
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(mask).astype(np.float32)
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


# --- the command line ------------------------------------------------------------------------

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
    p = argparse.ArgumentParser(
        prog="python -m segtune.predict",
        description="Class-id masks (and overlays) from a folder written by segtune.export.",
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
    p.add_argument("-v", "--verbose", action="store_true")
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
    args.out.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, 0
    for path in tqdm(images, desc="predict", unit="img", disable=None):
        try:
            image = read_image(path)
        except DatasetError as exc:
            log.warning("%s, skipped", exc)
            skipped += 1
            continue
        mask = predict_mask(model.forward, image, preprocess, args.tile, args.overlap)
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
