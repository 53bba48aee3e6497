"""Shared command-line plumbing: the options every command has, logging set-up, and turning
project errors into one line on stderr."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from segtune.errors import ConfigError, SegtuneError
from segtune.paths import path_kind


def command_parser(
    prog: str, description: str | None = None, *, tracking: bool = False
) -> argparse.ArgumentParser:
    """A command's parser with `-v` (and `--tracking-uri` for commands that use MLflow)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if tracking:
        parser.add_argument(
            "--tracking-uri",
            help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
        )
    return parser


def setup_logging(verbose: bool = False) -> None:
    """Our INFO lines, DEBUG with -v. MLflow's own INFO lines (its store's set-up, the system
    metrics monitor of every trial) only with -v: MLFLOW_LOGGING_LEVEL is read by MLflow's
    import, here and in every trial process (segtune.sweep.ray_init passes it on)."""
    if not verbose and "MLFLOW_LOGGING_LEVEL" not in os.environ:  # else the user's own choice
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # where MLflow is imported already
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def check_out_folder(path: Path, option: str) -> None:
    """Refuse in one line, before any work, an output folder that cannot be made: a file, a
    device, a broken symlink, or a path under one. Nothing is created."""
    for folder in (path, *path.parents):
        if os.path.lexists(folder):  # a broken symlink too
            if not folder.is_dir():
                raise ConfigError(f"{option} {path}: {folder} is {path_kind(folder)}, not a folder")
            return


def process_age() -> float:
    """Seconds since this process started, to 10 ms: a command's wall time. psutil's create_time
    adds the boot time in whole seconds (/proc/stat's btime), which puts the start up to a
    second early; on Linux the start in clock ticks since boot against CLOCK_BOOTTIME is exact."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):  # not Linux
        return time.time() - psutil.Process().create_time()


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
    """Run `main`; a SegtuneError becomes `error: <message>` on stderr and its exit code."""
    # MLflow's per-file download bars flood a terminal; our commands report progress themselves
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return int(main(argv) or 0)
    except SegtuneError as exc:
        say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        quiet_gone_streams()


def say(line: str) -> None:
    """`line` on stderr, which a closed terminal or a dropped SSH session may have taken away
    (EIO, EPIPE): the command still ends with its own exit status."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)


def quiet_gone_streams() -> None:
    """Point stdout and stderr at /dev/null where their reader is gone: Python flushes them at
    exit, and a failed flush there turns any exit status into 120."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
