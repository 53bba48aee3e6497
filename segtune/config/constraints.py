"""Constraints on a trial's metrics: `infer_ms_cpu<=50,size_mb<20`, one grammar for all.

A sweep's `tune.constraints` (kept before training, on the costs its cost stage measured) and the
`--constraints` filter of the report and the export (on what the trials logged) both read it
here, so a limit is written the same way wherever it applies. No pandas, no Ray, no MLflow: an
operator works on a number or on a whole pandas column alike.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from segtune.errors import ConfigError

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_NUMBER = r"([-+]?[\d.]+(?:[eE][-+]?\d+)?)"
_CONSTRAINT = re.compile(rf"^\s*([A-Za-z_][\w.\-]*)\s*(<=|>=|<|>)\s*{_NUMBER}\s*$")
_BOUND = re.compile(rf"^\s*(<=|>=|<|>)\s*{_NUMBER}\s*$")  # a sweep file's `"<=30"`
# a violation that must count as one though the values are equal (a strict `<` at its bound)
_AT_BOUND = 1e-9


@dataclass(frozen=True)
class Constraint:
    column: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value:g}"

    def holds(self, values: Any) -> Any:
        """Whether a number (or each number of a pandas column) meets it."""
        return _OPS[self.op](values, self.value)

    def violation(self, value: float | None) -> float:
        """How far `value` is past the bound: at most 0 where it holds, above 0 where it does
        not, infinite where it is unknown (Optuna's `constraints_func` convention)."""
        if value is None or math.isnan(value):
            return math.inf
        past = value - self.value if self.op in ("<=", "<") else self.value - value
        return min(past, 0.0) if self.holds(value) else max(past, _AT_BOUND)


def parse_constraints(text: str, option: str = "--constraints") -> list[Constraint]:
    """`"infer_ms_cpu<=50,size_mb<20"` to constraints; anything else is a ConfigError that
    names `option`, where the text came from."""
    constraints = []
    for part in text.split(","):
        match = _CONSTRAINT.match(part)
        if not part.strip() or match is None:
            raise ConfigError(
                f"{option} {text!r}: cannot read {part.strip()!r}; expected comma-separated "
                "METRIC<=VALUE constraints (operators <=, <, >=, >), e.g. "
                "'infer_ms_cpu<=50,size_mb<20'"
            )
        try:
            value = float(match.group(3))
        except ValueError:
            raise ConfigError(f"{option} {text!r}: {match.group(3)!r} is not a number") from None
        constraints.append(Constraint(match.group(1), match.group(2), value))
    return constraints


def constraints_of(mapping: Mapping[str, Any], option: str) -> list[Constraint]:
    """A sweep file's `{infer_ms_gpu: "<=5", size_mb: "<=30"}`, each entry read as `KEY<=5`."""
    constraints = []
    for key, bound in mapping.items():
        if not isinstance(bound, str) or _BOUND.match(bound) is None:
            raise ConfigError(
                f"{option}.{key}: cannot read {bound!r}; expected an operator (<=, <, >=, >) "
                "and a number, e.g. '<=30'"
            )
        constraints += parse_constraints(f"{key}{bound}", f"{option}.{key}")
    return constraints


def broken(constraints: list[Constraint], costs: Mapping[str, float]) -> list[str]:
    """What `costs` break, one `size_mb=42 breaks size_mb<=30` each; a key the costs lack
    breaks its constraint too (unknown is not within it)."""
    reasons = []
    for c in constraints:
        value = costs.get(c.column)
        if value is None:
            reasons.append(f"{c.column} unknown, needed by {c}")
        elif not c.holds(value):
            reasons.append(f"{c.column}={value:.4g} breaks {c}")
    return reasons
