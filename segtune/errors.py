"""The project's exception types: errors a user can cause, each with a message that says what to do."""

from __future__ import annotations

from collections.abc import Sequence


def problems_message(head: str, problems: Sequence[str]) -> str:
    """`head: problem` when there is one, so a single problem is always one line; else `head:`
    and one indented line per problem."""
    if len(problems) == 1:
        return f"{head}: {problems[0]}"
    return f"{head}:\n  " + "\n  ".join(problems)


class SegtuneError(Exception):
    """Base of every error a user can cause; CLIs print its message on one line and exit 2."""

    exit_code = 2


class ConfigError(SegtuneError):
    """A sweep file, trial configuration or command-line option is invalid."""


class DatasetError(SegtuneError):
    """A dataset root, split, image or mask is missing or malformed."""


class ModelError(SegtuneError):
    """A model cannot be built or its weights cannot be loaded."""


class TrainingDiverged(SegtuneError):
    """The loss became NaN or infinite."""
