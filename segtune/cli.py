"""Shared command-line plumbing: logging set-up and turning project errors into one line on stderr."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

from segtune.errors import SegtuneError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
    """Run `main`; a SegtuneError becomes `error: <message>` on stderr and its exit code."""
    # MLflow's per-file download bars flood a terminal; our commands report progress themselves
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return int(main(argv) or 0)
    except SegtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
