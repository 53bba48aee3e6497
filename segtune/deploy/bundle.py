"""The export folder's contract: its file names, card format and checksums.

`segtune.export` writes a folder by these names; `segtune.deploy.runtime` and
`segtune.predict` read it back, and nothing in it is loaded before its SHA-256 matches
`SHA256SUMS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from segtune.errors import ConfigError, ModelError, SegtuneError

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


class ExportError(SegtuneError):
    """Nothing to export: no checkpoint to download, an output folder that is not ours."""


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


def check_out(out: Path) -> None:
    """An existing --out is replaced only when it is an export folder (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out}: a file; choose a folder")
    ours = (out / CARD_FILE).exists() or (out / CHECKSUMS_FILE).exists()
    if any(out.iterdir()) and not ours:
        raise ExportError(
            f"--out {out}: exists and is not an export folder; choose another --out or empty it"
        )


def publish(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
