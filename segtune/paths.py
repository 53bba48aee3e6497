"""Paths in messages and writes: what a path is, in a user's words, and writing a file so that
a crash never leaves half of it."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
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
