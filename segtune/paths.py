"""Paths in messages and writes: what a path is, in a user's words, and writing a file so that
a crash never leaves half of it."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_KINDS = (
    (stat.S_ISREG, "a file"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def path_kind(path: Path) -> str:
    """What `path` is, for a message: 'a file', 'a folder', 'a character device', 'a symlink
    to /dev/zero, a character device', 'missing'. A device or a pipe is not "missing": reading
    one never ends or reads nothing, and the user needs to hear which it is."""
    try:
        mode = path.stat().st_mode
    except OSError:
        if path.is_symlink():
            return "a symlink that leads nowhere (broken, or a loop)"
        return "missing"
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    if path.is_symlink():
        return f"a symlink to {os.path.realpath(path)}, {kind}"
    return kind


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """`write(temporary path)` beside `path`, then one rename: a reader (or a crash) sees the
    old file or the whole new one, never half of one. The temporary name is created
    exclusively, so it never collides with a user's file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextmanager
def folder_written_whole(target: Path) -> Iterator[Path]:
    """A partial folder beside `target` to fill, renamed onto it (missing, or an empty folder)
    when the block ends and removed if it raises: readers see no folder or the whole one. Hold
    the target's lock: the partial folders a killed writer left are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        yield partial
        if target.is_dir():
            target.rmdir()  # empty, or OSError: never replaces a user's files
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
