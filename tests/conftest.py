"""Shared fixtures: small datasets on disk in the real layout. And the slow tier's rule: a test
that starts a Ray cluster, a server or a browser is marked `ray`, `server` or `browser` from its
code (its own, its fixtures' and that of the helpers of tests/ they call), so that `make check`
leaves it out without anyone remembering to mark it. A test whose code names none of STARTS but
starts one all the same (a command that starts its own server) carries the marker by hand."""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import random_pair, write_pair

# What starts each, as code names it: a sweep's driver (in this process or as `python -m
# segtune.run`; Ray starts beside its pre-flight) or ray.init; an MLflow, PostgreSQL or S3
# server; a headless Chromium
STARTS = {
    "ray": re.compile(
        r'\brun_main\b|"-m", "segtune\.run"|-m segtune\.run\b|ray\.init\(|\bstart_ray\b'
    ),
    "server": re.compile(r"\b(tracking|mlflow|postgres|s3|weights)_server\b|\"tracking-server\""),
    "browser": re.compile(r"chromium", re.IGNORECASE),
}


def _code(obj: object) -> Iterator[types.CodeType]:
    """The code of a function, or of a class's own functions, nested functions included."""
    funcs = (
        [obj]
        if inspect.isfunction(obj)
        else [f for f in vars(obj).values() if inspect.isfunction(f)]
    )
    todo = [f.__code__ for f in funcs]
    while todo:
        code = todo.pop()
        yield code
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))


def _sources(roots: list[Callable[..., object]]) -> Iterator[str]:
    """The source of each root and of every function or class of tests/ that it names, in
    turn: the helpers a test calls start what it starts."""
    seen: set[object] = set()
    todo: list[object] = list(roots)
    while todo:
        obj = todo.pop()
        if obj in seen:
            continue
        seen.add(obj)
        yield inspect.getsource(obj)
        scope = getattr(obj, "__globals__", None) or vars(inspect.getmodule(obj))
        for name in {n for code in _code(obj) for n in code.co_names}:
            found = scope.get(name)
            ours = getattr(found, "__module__", None) or ""
            if (inspect.isfunction(found) or inspect.isclass(found)) and ours.startswith("tests."):
                todo.append(found)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by what its code, its fixtures' and its helpers' start (STARTS)."""
    starts: dict[tuple[Callable[..., object], ...], list[str]] = {}  # parametrized tests share
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        fixtures = [defs[-1].func for defs in item._fixtureinfo.name2fixturedefs.values()]
        roots = (item.function, *(f for f in fixtures if f.__module__.startswith("tests.")))
        if roots not in starts:
            text = "\n".join(_sources(list(roots)))
            starts[roots] = [marker for marker, pattern in STARTS.items() if pattern.search(text)]
        for marker in starts[roots]:
            if not item.get_closest_marker(marker):
                item.add_marker(marker)


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    """Six train and two test pairs of random content, 64x48."""
    rng = np.random.default_rng(0)
    for i in range(6):
        write_pair(tmp_path, "train", f"t{i}", *random_pair(rng))
    for i in range(2):
        write_pair(tmp_path, "test", f"v{i}", *random_pair(rng))
    return tmp_path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic aerial set (generated once per test session)."""
    from segtune.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_train=24, n_test=8, size=(128, 96), seed=0, progress=False)
    return root
