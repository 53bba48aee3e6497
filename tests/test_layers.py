"""The arrows between the packages point down: the dashboards draw from segtune, never the
other way round, and the training core runs without Ray or MLflow."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what runs on any machine without a cluster or a tracking server: no Ray, no MLflow in it
CORE = (
    "segtune.classes",
    "segtune.config",
    "segtune.cost",
    "segtune.data.baseline",
    "segtune.data.convert_floodnet",
    "segtune.data.pipeline",
    "segtune.data.stats",
    "segtune.data.synthetic",
    "segtune.device",
    "segtune.engine",
    "segtune.grammar",
    "segtune.evaluation",
    "segtune.losses",
    "segtune.metrics",
    "segtune.models",
    "segtune.prepare",
    "segtune.storage",
    "segtune.sweepfile",
    "segtune.tracking.address",
    "segtune.tracking.names",
    "segtune.train",
)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_segtune_never_imports_dashboards() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(
            n for n in imported_modules(path) if n.split(".")[0] == "dashboards"
        )
        for path in (REPO / "segtune").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_training_core_imports_neither_ray_nor_mlflow() -> None:
    """Imported in a fresh interpreter: what they pull in transitively counts too."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(CORE)!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_dashboards_read_mlflow_only_through_segtune_tracking() -> None:
    for path in (REPO / "dashboards").rglob("*.py"):
        segtune = {n for n in imported_modules(path) if n.split(".")[0] == "segtune"}
        allowed = {"segtune.cli", "segtune.classes", "segtune.errors", "segtune.scores"}
        assert {n for n in segtune if not n.startswith("segtune.tracking")} <= allowed, path


def test_no_module_does_several_jobs() -> None:
    """A module past ~400 lines is doing several jobs; the synthetic renderer is one coherent
    exception."""
    exempt = {"segtune/data/synthetic.py"}
    long = {
        str(path.relative_to(REPO)): n
        for folder in ("segtune", "dashboards")
        for path in (REPO / folder).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert {k: v for k, v in long.items() if k not in exempt} == {}


ENTRY_POINTS = (
    "segtune.run",
    "segtune.train",
    "segtune.bench",
    "segtune.export",
    "segtune.predict",
    "segtune.data.synthetic",
    "segtune.data.baseline",
    "segtune.data.stats",
    "segtune.data.convert_floodnet",
    "dashboards.report",
)


def test_entry_points_import_without_network() -> None:
    """A cluster node without internet: no entry point calls out when imported (albumentations
    checks for updates unless NO_ALBUMENTATIONS_UPDATE is set, which segtune does itself)."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root (unshare --net)")
    code = (
        "import importlib, os, time\n"
        f"for name in {list(ENTRY_POINTS)!r}: importlib.import_module(name)\n"
        "time.sleep(1)  # a version check runs in the background\n"
        "print(os.environ['NO_ALBUMENTATIONS_UPDATE'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    try:
        done = subprocess.run(
            ["unshare", "--net", "--", sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except OSError as exc:
        pytest.skip(f"unshare is not available: {exc}")
    if done.returncode != 0 and "unshare" in done.stderr:
        pytest.skip(f"no network namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "1"
    for symptom in ("name resolution", "Name or service", "urlopen error", "version info"):
        assert symptom not in done.stderr, done.stderr


def _new_modules(code: str) -> set[str]:
    """The modules `code` imports beyond those the driver has when its Ray starts."""
    before = (
        "import json, sys, concurrent.futures, threading, segtune.run, segtune.ray_start, "
        "segtune.tracking.runs, segtune.tracking.outage\nbefore = set(sys.modules)\n"
    )
    after = "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    done = subprocess.run([sys.executable, "-c", before + code + after], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_ray_start_and_the_preflight_thread_never_import_one_module_at_once() -> None:
    """segtune.run starts Ray in its main thread while a thread imports PREFLIGHT_IMPORTS: a
    module that both imported at once could be handed half-initialised to one of them."""
    ray_init = _new_modules(
        "import ray\nray.init(include_dashboard=False, configure_logging=False, "
        "runtime_env={'env_vars': {'A': '1'}})\nray.shutdown()\n"
    )
    preflight = _new_modules(
        "import importlib\nfrom segtune.run import PREFLIGHT_IMPORTS\n"
        "for name in PREFLIGHT_IMPORTS: importlib.import_module(name)\n"
    )
    assert len(ray_init) > 50 and len(preflight) > 1000  # both import plenty on their own
    assert ray_init & preflight == set()
