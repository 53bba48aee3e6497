"""One decoded copy of the data per node (`data.cache: true`): each split's uint8 images and
masks in one memory-mapped file that every trial and every loader worker on the node maps
read-only, so eight trials on a node hold one copy, not eight, and only the first decodes.

A cache is a folder ``segtune-decoded-v<format>-<dataset hash>-<files>-<split>[-rgb]`` in
`data.cache_dir` (default: /dev/shm when the copy takes at most half its free space, else the
temp dir), holding ``pixels.npy`` (every pair's image, then its mask, back to back) and
``index.json`` (each id's offset and size). It is written under a partial name and renamed
whole, under a node-wide file lock; caches of other datasets beyond the `KEEP_OTHER` most
recently used are removed, oldest first, unless a process maps them (each holds a shared
flock on the index). Only names of this form are ever removed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from segtune.data.dataset import Sample, decode_pair
from segtune.errors import DatasetError
from segtune.paths import folder_written_whole

log = logging.getLogger(__name__)

FORMAT = 1  # the layout of a cache folder: a new one never reads an old one
PREFIX = "segtune-decoded-"
NAME = re.compile(rf"{PREFIX}(?P<dataset>v\d+-[0-9a-f]+-\d+)-(?P<split>train|val|test)(-rgb)?")
PIXELS, INDEX = "pixels.npy", "index.json"
KEEP_OTHER = 2  # caches of other datasets (fingerprints) kept in the folder, most recently used
SHM = Path("/dev/shm")
BYTES_PER_PIXEL = 4  # three for the image, one for the mask


def cache_name(fingerprint: str, split: str, rgb_masks: bool) -> str:
    """The cache folder's name: what changes the decoded pixels (the dataset's files, the split,
    how masks are read) and the layout's version."""
    files, digest = fingerprint.split(":")
    return f"{PREFIX}v{FORMAT}-{digest}-{files}-{split}" + ("-rgb" if rgb_masks else "")


def decoded_bytes(sizes: Iterable[tuple[int, int]]) -> int:
    """The size of a cache of images of these (width, height)."""
    return sum(width * height * BYTES_PER_PIXEL for width, height in sizes)


def _free(folder: Path) -> int:
    while not folder.exists():  # a cache_dir not made yet: the file system it would be on
        folder = folder.parent
    return shutil.disk_usage(folder).free


def cache_folder(cache_dir: str | None, needed: Mapping[str, int]) -> Path:
    """Where the caches `needed` ({name: bytes}) live on this node: `cache_dir`, else the
    default folder that already holds one of them, else /dev/shm when they take at most half
    its free space (the rest stays for Ray's object store), else the temp dir."""
    if cache_dir is not None:
        return Path(cache_dir)
    temp = Path(tempfile.gettempdir())
    candidates = [SHM, temp] if SHM.is_dir() and os.access(SHM, os.W_OK) else [temp]
    for folder in candidates:
        if any((folder / name).is_dir() for name in needed):
            return folder
    return SHM if candidates[0] == SHM and 2 * sum(needed.values()) <= _free(SHM) else temp


def room_problem(cache_dir: str | None, needed: Mapping[str, int]) -> str | None:
    """The pre-flight's line when the caches `needed` ({name: bytes}) that are not there yet
    do not fit where they would be written; None when they fit."""
    folder = cache_folder(cache_dir, needed)
    missing = sum(size for name, size in needed.items() if not (folder / name).is_dir())
    free = _free(folder)
    if missing <= free:
        return None
    return (
        f"data.cache: the decoded copy of the data needs {missing / 1e9:.3g} GB, "
        f"{free / 1e9:.3g} GB free in {folder}; set data.cache_dir to a node-local folder "
        "with room, or data.cache: false (decode every epoch)"
    )


def _hold(path: Path, exclusive: bool = False) -> int | None:
    """An open descriptor of the cache's index with a shared flock (a process maps the cache:
    eviction leaves it), or an exclusive one (no process maps it); None when a process holds
    it, or it is gone."""
    try:
        fd = os.open(path / INDEX, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if exclusive else fcntl.LOCK_SH)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class DecodedSplit:
    """One split's decoded pairs, mapped read-only on first use in each process: a DataLoader
    worker (forked or spawned) is handed the path, never the pixels. While it lives, the
    process holds a shared lock on the cache, so that no eviction removes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held: int | None = self._hold()
        index = json.loads((path / INDEX).read_text())
        self.rows = {
            sample_id: (offset, height, width)
            for sample_id, offset, (height, width) in zip(
                index["ids"], index["offsets"], index["shapes"], strict=True
            )
        }
        self._pixels: np.ndarray | None = None

    def _hold(self) -> int:
        fd = _hold(self.path)
        if fd is None:
            raise DatasetError(f"{self.path}: the decoded data was removed (by hand?); run again")
        return fd

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pixels": None, "_held": None}

    def __del__(self) -> None:
        held = getattr(self, "_held", None)  # None: __init__ failed, or a worker never read
        if held is not None:
            os.close(held)

    def pair(self, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 image (H, W, 3) and mask (H, W) of a sample: read-only views of the map."""
        if self._pixels is None:
            if self._held is None:  # a spawned worker holds the cache itself before it maps it
                self._held = self._hold()
            # read-only, like the arrays Pillow decodes: a transform never writes its input
            self._pixels = np.load(self.path / PIXELS, mmap_mode="r")
        offset, height, width = self.rows[sample_id]
        end = offset + height * width * 3
        pixels = self._pixels
        image = np.asarray(pixels[offset:end]).reshape(height, width, 3)
        return image, np.asarray(pixels[end : end + height * width]).reshape(height, width)


def _write(partial: Path, samples: Sequence[Sample], rgb_masks: bool, progress: bool) -> None:
    """Decode every pair (in threads, like the check) into the partial folder's map."""
    partial.mkdir()
    shapes = [(s.height, s.width) for s in samples]
    ends = np.cumsum([h * w * BYTES_PER_PIXEL for h, w in shapes]).tolist()
    offsets = [0, *ends[:-1]]
    pixels = np.lib.format.open_memmap(partial / PIXELS, "w+", np.uint8, (ends[-1],))
    with ThreadPoolExecutor(max_workers=4) as pool:
        pairs = pool.map(lambda s: decode_pair(s, rgb_masks), samples)
        for offset, (image, mask) in zip(
            offsets,
            tqdm(pairs, total=len(samples), desc="caching", disable=not progress, leave=False),
            strict=True,
        ):
            pixels[offset : offset + image.size] = image.reshape(-1)
            pixels[offset + image.size : offset + image.size + mask.size] = mask.reshape(-1)
    pixels.flush()
    del pixels  # unmapped: the writer keeps no share of the pages
    index = {"ids": [s.id for s in samples], "offsets": offsets, "shapes": shapes}
    (partial / INDEX).write_text(json.dumps(index))


def _evict(folder: Path, keep: set[str]) -> None:
    """Remove the caches of other datasets than `keep` beyond the `KEEP_OTHER` most recently
    used, oldest first, but none that a process maps; and partial folders (the caller holds
    the node's lock: no writer is alive)."""
    caches: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        if path.name.startswith(f".{PREFIX}") and ".partial-" in path.name:
            shutil.rmtree(path, ignore_errors=True)
        elif (
            (found := NAME.fullmatch(path.name))
            and found["dataset"] not in keep
            and path.is_dir()
            and not path.is_symlink()  # never follows a link out of the folder
        ):
            caches.setdefault(found["dataset"], []).append(path)
    by_use = sorted(caches.values(), key=lambda paths: max(p.stat().st_mtime for p in paths))
    for paths in by_use[: max(0, len(by_use) - KEEP_OTHER)]:
        for path in paths:
            fd = _hold(path, exclusive=True)
            if fd is None:
                continue  # in use (or no index: a folder a hand made) stays
            log.info("removing %s: a cache of another dataset, the least recently used", path)
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)


def ensure_decoded(
    cache_dir: str | None,
    splits: Mapping[str, Sequence[Sample]],
    rgb_masks: bool,
    progress: bool = True,
) -> dict[str, DecodedSplit]:
    """The caches of `splits` ({cache name: checked samples}), decoded by the first caller on
    the node while the others wait on the lock, then mapped by every one of them."""
    needed = {name: decoded_bytes((s.width, s.height) for s in got) for name, got in splits.items()}
    folder = cache_folder(cache_dir, needed)
    if not all((folder / name).is_dir() for name in splits):
        with FileLock(Path(tempfile.gettempdir()) / f".{PREFIX}lock"):  # one per node
            folder = cache_folder(cache_dir, needed)
            folder.mkdir(parents=True, exist_ok=True)
            keep = {found["dataset"] for name in splits if (found := NAME.fullmatch(name))}
            _evict(folder, keep)
            problem = room_problem(cache_dir, needed)
            if problem:
                raise DatasetError(problem)
            for name, samples in splits.items():
                if not (folder / name).is_dir():
                    log.info("decoding %d pairs into %s", len(samples), folder / name)
                    with folder_written_whole(folder / name) as partial:
                        _write(partial, samples, rgb_masks, progress)
    for name in splits:
        os.utime(folder / name)  # most recently used: the last one removed
    return {name: DecodedSplit(folder / name) for name in splits}
