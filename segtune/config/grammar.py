"""The grammar of a sweep's `search_space` and its checks against the trial keys, before Ray.

Per key: a scalar, or one of `grid_search`, `choice` (lists), `uniform`, `loguniform` ([low,
high] of a float key), `randint` ([low, high] of an int key, both inclusive). A key that is not a
trial key is a *group*: a `grid_search` or `choice` over mappings of trial keys. Every value and
bound is checked by TrialConfig's own field, so no rule is written twice; the sweep's size is
counted by arithmetic. `segtune.config.sweep` applies these to a whole sweep file; `segtune.sweep.space`
turns a valid space into Ray Tune's `param_space`. No Ray, no MLflow here.
"""

from __future__ import annotations

import difflib
import math
import reprlib
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import ValidationError

from segtune.config.trial import TrialConfig, format_validation_error

LIST_FORMS = ("grid_search", "choice")
RANGE_FORMS = ("uniform", "loguniform", "randint")  # [low, high]
SEARCH_FORMS = (*LIST_FORMS, *RANGE_FORMS)
# The most trials one sweep holds: each is a Ray trial in the experiment state that Tune rewrites
# at every checkpoint, and an MLflow run that the summary, the report and the tables load; at a
# minute a trial, 10 000 are a week of one slot. A larger study is several sweeps.
MAX_TRIALS = 10_000
# The most combinations of discrete values (grid_search and choice lists, seeds): the pre-flight
# and the cost stage build each one's trial configuration (100 000 take about 2 s and 80 MB).
MAX_COMBINATIONS = 100_000


def search_form(spec: Any) -> tuple[str | None, Any]:
    """A `search_space` entry as (form, values): `(None, value)` for a fixed value."""
    if isinstance(spec, dict) and len(spec) == 1:
        return next(iter(spec.items()))
    return None, spec


def is_group(key: str) -> bool:
    """A `search_space` key that is not a trial key holds a list of mappings of trial keys."""
    return key not in TrialConfig.model_fields


_TRIAL_FIELDS = TrialConfig.model_fields


def check_trial_values(values: Mapping[str, Any], where: str, problems: list[str]) -> None:
    """Type-check trial keys against TrialConfig, one problem line per key."""
    try:
        TrialConfig.model_validate(dict(values))
    except ValidationError as exc:
        problems.extend(format_validation_error(exc, where).splitlines())


def did_you_mean(word: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, names, 1)
    return f" (did you mean {close[0]}?)" if close else ""


def _value_problem(key: str, value: Any) -> str | None:
    """What TrialConfig's own field says of `value` for `key`, or None when it takes it."""
    try:
        TrialConfig.model_validate({key: value})
    except ValidationError as exc:
        return str(exc.errors()[0]["msg"])
    return None


def _kind_text(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return {bool: "true or false", str: "text"}.get(annotation) or getattr(
        annotation, "__name__", str(annotation)
    )


def check_param(key: str, spec: Any, where: str, problems: list[str]) -> None:
    """One search-space entry: a scalar, or one of SEARCH_FORMS over values the key takes."""
    if not isinstance(spec, dict):
        check_trial_values({key: spec}, where.rsplit(".", 1)[0], problems)
        return
    form, values = search_form(spec)
    if form not in SEARCH_FORMS:
        got = f"unknown form {form!r}" if form is not None else f"a mapping of {len(spec)} keys"
        problems.append(f"{where}: {got}; expected a value or one of {', '.join(SEARCH_FORMS)}")
        return
    mappings = isinstance(values, list) and all(isinstance(v, dict) for v in values)
    if is_group(key) and (form not in LIST_FORMS or not mappings):
        problems.append(
            f"{where}: '{key}' is not a trial key{did_you_mean(key, list(_TRIAL_FIELDS))}; a "
            f"group key must hold a list of mappings of trial keys (valid trial keys: "
            f"{', '.join(_TRIAL_FIELDS)})"
        )
        return
    if form in RANGE_FORMS:
        _check_range(key, form, values, f"{where}.{form}", problems)
        return
    if not isinstance(values, list) or not values:
        problems.append(f"{where}.{form}: expected a non-empty list")
        return
    for i, value in enumerate(values):
        at = f"{where}.{form}[{i}]"
        if is_group(key):
            unknown = sorted(set(value) - set(_TRIAL_FIELDS))
            if unknown:
                problems.append(f"{at}: unknown trial keys {unknown}")
            check_trial_values({k: v for k, v in value.items() if k in _TRIAL_FIELDS}, at,
                                problems)  # fmt: skip
        elif (problem := _value_problem(key, value)) is not None:
            problems.append(f"{at}: {problem}")


def _check_range(key: str, form: str, values: Any, where: str, problems: list[str]) -> None:
    """[low, high] of a numeric key: randint for an int key, uniform or loguniform for a float
    one; each bound a value the key's field takes, low below high, and above 0 on a log scale."""
    kind = _TRIAL_FIELDS[key].annotation
    if kind not in (int, float):
        problems.append(f"{where}: {key} takes {_kind_text(kind)}, not a range of numbers: list "
                        "its values with choice or grid_search")  # fmt: skip
        return
    if (kind is int) != (form == "randint"):
        fix = "randint [low, high]" if kind is int else "uniform or loguniform"
        problems.append(f"{where}: {key} takes {'integers' if kind is int else 'real numbers'}, "
                        f"not what {form} samples: use {fix}")  # fmt: skip
        return
    numbers = (int,) if kind is int else (int, float)
    if (
        not isinstance(values, list)
        or len(values) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers) for v in values)
    ):
        what = "integers" if kind is int else "numbers"
        problems.append(f"{where}: expected [low, high], two {what}; got {reprlib.repr(values)}")
        return
    low, high = values
    if form == "randint" and (low < -(2**63) or high >= 2**63 - 1):  # numpy's int64, high + 1
        problems.append(f"{where}: randint samples 64-bit integers; got {reprlib.repr(values)}")
        return
    if form == "loguniform" and low <= 0:
        problems.append(f"{where}: need 0 < low < high on a log scale; got {reprlib.repr(values)}")
        return
    bounds = [(i, _value_problem(key, v)) for i, v in enumerate(values)]
    problems.extend(f"{where}[{i}]: {problem}" for i, problem in bounds if problem is not None)
    if all(problem is None for _, problem in bounds) and low >= high:
        problems.append(f"{where}: need low < high; got {reprlib.repr(values)}")


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**15 else f"about 10^{int(math.log10(n))}"


def size_problems(space: Mapping[str, Any], num_samples: int, repeats: int) -> list[str]:
    """A sweep's trials and discrete combinations, counted by arithmetic (their enumeration is
    what this bound prevents): num_samples runs each grid point, each seed a grid point."""
    counts = dict.fromkeys(LIST_FORMS, 1)
    for form, values in map(search_form, space.values()):
        if form in LIST_FORMS and isinstance(values, list):
            counts[form] *= len(values)
    grid = counts["grid_search"]
    trials, problems = num_samples * grid * repeats, []
    if trials > MAX_TRIALS:
        problems.append(
            f"sweep size: {_count(trials)} trials (num_samples {_count(num_samples)} x "
            f"{_count(grid)} grid point{'s' * (grid != 1)} x repeats {_count(repeats)}), more "
            f"than the {MAX_TRIALS:,} one sweep holds (each is a Ray trial and an MLflow run): "
            "split the study into several sweeps"
        )
    combinations = grid * counts["choice"] * repeats
    if combinations > MAX_COMBINATIONS and grid * repeats <= MAX_TRIALS:
        problems.append(
            f"search_space: {_count(combinations)} combinations of grid_search and choice values "
            f"(and seeds), more than the {MAX_COMBINATIONS:,} the pre-flight checks one by one: "
            "list fewer values, or sample numbers from a range (uniform, loguniform, randint)"
        )
    return problems
