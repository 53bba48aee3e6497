"""The export folder's contract: its file names, card format and checksums.

`segtune.export` writes a folder by these names; `segtune.deploy.runtime` and
`segtune.predict` read it back, and nothing in it is loaded before its SHA-256 matches
`SHA256SUMS`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from segtune.cli import check_out_folder
from segtune.errors import ConfigError, ModelError, SegtuneError

CARD_FILE = "model_card.json"
TORCHSCRIPT_FILE = "model.pt"
ONNX_FILE = "model.onnx"
CHECKPOINT_FILE = "best.pt"
README_FILE = "README.md"
CHECKSUMS_FILE = "SHA256SUMS"
EXPORT_FILES = (
    CARD_FILE,
    TORCHSCRIPT_FILE,
    ONNX_FILE,
    CHECKPOINT_FILE,
    README_FILE,
    CHECKSUMS_FILE,
)
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


@dataclass(frozen=True)
class OutFolder:
    """What `--out` holds: an earlier export's files (`ours`, replaced) and anything else
    (`others`, a user's: never deleted or overwritten)."""

    path: Path  # the folder itself (a symlink's target)
    exists: bool
    ours: frozenset[str] = frozenset()
    others: tuple[str, ...] = ()


def export_files(folder: Path) -> frozenset[str]:
    """The files of an earlier segtune export in `folder`, or none: recognised by its card AND
    its SHA256SUMS, which lists the card and only names an export writes, every one of them a
    plain file there whose SHA-256 matches. One file name proves nothing (a user's downloads
    folder has a SHA256SUMS of its own)."""
    try:
        listed = set(read_checksums(folder))
        if CARD_FILE not in listed or not listed <= set(EXPORT_FILES):
            return frozenset()
        if any((folder / name).is_symlink() for name in (*listed, CHECKSUMS_FILE)):
            return frozenset()
        verify_files(folder, sorted(listed))
        load_card(folder)
    except (SegtuneError, OSError, ValueError):  # ValueError: a SHA256SUMS that is not text
        return frozenset()
    return frozenset({*listed, CHECKSUMS_FILE})


def check_out(out: Path, force: bool) -> OutFolder:
    """Where an export may go: a missing or empty folder, or an earlier export alone; with
    `force`, also a folder with other files, provided none of them bears an export's name.
    Anything else is refused in one line, before any download."""
    check_out_folder(out, "--out")  # a file, a device, a path under a file, a broken symlink
    out = out.resolve() if out.is_symlink() else out.absolute()
    parent = next((p for p in out.parents if p.exists()), out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(
            f"--out {out}: {parent} is not writable (the export is written beside --out, then "
            "renamed into place); choose another --out"
        )
    if not out.exists():
        return OutFolder(out, exists=False)
    if not os.access(out, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: the folder is not writable; choose another --out")
    ours = export_files(out)
    others = tuple(sorted(p.name for p in out.iterdir() if p.name not in ours))
    if others and not force:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ExportError(
            f"--out {out}: not an earlier export of segtune (it holds {shown}); choose another "
            "--out, or pass --force to write the export beside those files (they are kept)"
        )
    taken = [name for name in others if name in EXPORT_FILES]
    if taken:
        one = len(taken) == 1
        raise ExportError(
            f"--out {out}: {', '.join(taken)} there {'is' if one else 'are'} not from a segtune "
            f"export (no model card and SHA256SUMS there verify {'it' if one else 'them'}); "
            "even --force never overwrites a file segtune did not write: move "
            f"{'it' if one else 'them'}, or choose another --out"
        )
    return OutFolder(out, exists=True, ours=ours, others=others)


def publish(staging: Path, out: Path, force: bool, aside: Path) -> Path:
    """Put the finished export in `staging` at `out`, checked again (the folder may have
    changed while the export was written). A missing folder: one rename. An earlier export
    alone: renamed to `aside` (the caller removes it), the new one renamed in; the old one is
    always somewhere whole. A folder with other files (or empty): file by file, SHA256SUMS
    taken out first and put in last, so a reader never loads a mix (it fails verification);
    the earlier export's files the new one does not write are removed, nothing else is."""
    folder = check_out(out, force)
    out = folder.path
    if not folder.exists:
        os.rename(staging, out)
    elif folder.ours and not folder.others:
        os.rename(out, aside)
        try:
            os.rename(staging, out)
        except OSError:
            os.rename(aside, out)
            raise
    else:
        new = sorted(p.name for p in staging.iterdir())
        if CHECKSUMS_FILE in folder.ours:
            (out / CHECKSUMS_FILE).unlink()
        for name in new:
            if name != CHECKSUMS_FILE:
                os.replace(staging / name, out / name)
        for name in sorted(folder.ours - set(new)):
            (out / name).unlink(missing_ok=True)
        os.replace(staging / CHECKSUMS_FILE, out / CHECKSUMS_FILE)
    return out
