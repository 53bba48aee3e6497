"""An export folder at work: the verified model file behind a forward function, the trial's
evaluation preprocessing, and tiled prediction of large images.

Preprocessing is the trial's evaluation, read from the export's `model_card.json`: the geometry
of `eval_transform` (pad bottom/right to a multiple of 32 with black, by default) and the card's
normalisation; the prediction is cropped back to the image. Images larger than a tile on a side
are cut into overlapping tiles whose softmax outputs are averaged with a window that fades out
over the overlap, so tile seams do not show.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F

from segtune.classes import colorize
from segtune.data.transforms import eval_transform
from segtune.deploy.bundle import JIT_DEPRECATION, Forward, load_card, verify_files
from segtune.errors import ConfigError, ModelError
from segtune.models.device import resolve_device

log = logging.getLogger(__name__)


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
