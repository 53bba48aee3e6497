"""Helpers for tests: small image/mask pairs in the docs/design.md layout, and driver processes."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

T = TypeVar("T")


def write_pair(
    root: Path, split: str, sample_id: str, image: np.ndarray, mask: np.ndarray, ext: str = ".jpg"
) -> tuple[Path, Path]:
    """Write one image/mask pair in the docs/design.md layout."""
    (root / split / "image").mkdir(parents=True, exist_ok=True)
    (root / split / "mask").mkdir(parents=True, exist_ok=True)
    image_path = root / split / "image" / f"{sample_id}{ext}"
    mask_path = root / split / "mask" / f"{sample_id}.png"
    Image.fromarray(image).save(image_path, quality=95)
    Image.fromarray(mask).save(mask_path)
    return image_path, mask_path


def random_pair(
    rng: np.random.Generator, height: int = 48, width: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    return (
        rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        rng.integers(0, 8, (height, width), dtype=np.uint8),
    )


def start_driver(
    cmd: Sequence[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """A command in its own session, its output to the file `log`: an undrained pipe would
    block the process's logging, and the signals a test sends it."""
    with open(log, "w") as out:
        return subprocess.Popen(list(cmd), cwd=cwd, env=env, text=True, start_new_session=True,
                                stdout=out, stderr=out)  # fmt: skip


def wait_for(
    event: Callable[[], T],
    what: str | Callable[[], str],
    timeout: float = 240,
    process: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
    every: float = 0.2,
) -> T:
    """`event()` once it is truthy: a test waits for the event itself (a file, a log line, a run
    state), however slowly a busy machine gets there; the generous `timeout` only turns a hang
    into a failure. A `process` that ends first fails the wait at once; the failure names
    `what` was waited for and ends with the tail of `log`."""
    deadline = time.monotonic() + timeout
    while True:
        ended = process is not None and process.poll() is not None
        if found := event():  # asked after the check: an event just before the end counts
            return found
        if ended or time.monotonic() > deadline:
            how = f"the process exited {process.returncode}" if ended else f"{timeout:g} s passed"
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(
                f"waited for {what if isinstance(what, str) else what()}: {how}\n{tail}"
            )
        time.sleep(every)


def mount_namespace_missing() -> str | None:
    """Why this machine cannot give a process its own mounts (`unshare --mount`), or None."""
    if os.geteuid() != 0:
        return "a mount namespace of the test's own needs root (unshare --mount)"
    try:
        subprocess.run(["unshare", "--mount", "--fork", "true"], check=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unshare --mount does not work here: {exc}"
    return None
