"""The arrows between the packages point down: the dashboards draw from segtune, never the
other way round, and the training core runs without Ray or MLflow."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("run", "train", "bench", "export", "predict", "cluster")
FOUNDATIONS = ("classes", "errors", "cli", "paths")
# the layers, lowest first (docs/design.md, "Layers"): a module imports only from its own layer,
# a lower one or the foundations; the commands sit above every layer
LAYERS = ("config", "data", "models", "training", "tracking", "deploy", "sweep")
# what runs on any machine without a cluster or a tracking server: no Ray, no MLflow in them
CORE = ("config", "data", "models", "training")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_of(name: str) -> str:
    """`segtune.sweep.driver` -> `sweep`; a top-level module is its own name."""
    return name.split(".")[1] if name.count(".") >= 1 else ""


def modules_of(folder: str) -> list[Path]:
    return sorted((REPO / "segtune" / folder).rglob("*.py"))


def test_the_top_of_segtune_holds_only_commands_and_foundations() -> None:
    top = {p.stem for p in (REPO / "segtune").glob("*.py")} - {"__init__"}
    folders = {p.name for p in (REPO / "segtune").iterdir() if (p / "__init__.py").is_file()}
    assert top == set(COMMANDS) | set(FOUNDATIONS)
    assert folders == set(LAYERS)


def _points_up(layer: str, name: str) -> bool:
    top = name.split(".")[0]
    if top in ("ray", "mlflow", "dashboards"):
        return top == "dashboards" or layer in CORE or (top == "ray" and layer != "sweep")
    other = package_of(name) if top == "segtune" else ""
    return other in COMMANDS or (other in LAYERS and LAYERS.index(other) > LAYERS.index(layer))


def layer_violations(files: dict[str, set[str]]) -> dict[str, list[str]]:
    """{file: imports that point up or sideways}, for files named `segtune/<layer>/...`; the
    rule of LAYERS, with no module importing a command and Ray imported only by `sweep`."""
    found: dict[str, list[str]] = {}
    for file, names in files.items():
        layer = file.split("/")[1]
        bad = [name for name in names if _points_up(layer, name)]
        if bad:
            found[file] = sorted(bad)
    return found


def test_imports_point_down_the_layers() -> None:
    files = {
        str(path.relative_to(REPO)): imported_modules(path)
        for layer in LAYERS
        for path in modules_of(layer)
    }
    assert layer_violations(files) == {}


def test_the_rule_catches_a_training_module_that_imports_ray() -> None:
    """The rule bites: what a module of training/ importing Ray (or MLflow, or the sweep layer,
    or a command) would be told."""
    engine = "segtune/training/engine.py"
    for name in ("ray.tune", "mlflow", "segtune.sweep.driver", "segtune.run"):
        assert layer_violations({engine: {"torch", name}}) == {engine: [name]}
    assert layer_violations({engine: {"torch", "segtune.models.device"}}) == {}


def test_foundations_import_no_layer_and_no_command() -> None:
    for name in FOUNDATIONS:
        path = REPO / "segtune" / f"{name}.py"
        segtune = {n for n in imported_modules(path) if n.split(".")[0] == "segtune"}
        assert {package_of(n) for n in segtune} <= set(FOUNDATIONS), path


def test_the_core_imports_neither_ray_nor_mlflow() -> None:
    """Every module of the core imported in a fresh interpreter: what they pull in transitively
    counts too."""
    names = [
        "segtune." + str(path.relative_to(REPO / "segtune").with_suffix("")).replace("/", ".")
        for layer in CORE
        for path in modules_of(layer)
    ]
    names = [n.removesuffix(".__init__") for n in names]
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_dashboards_read_only_tracking_config_and_the_foundations() -> None:
    for path in (REPO / "dashboards").rglob("*.py"):
        segtune = {n for n in imported_modules(path) if n.split(".")[0] == "segtune"}
        assert {package_of(n) for n in segtune} <= {"tracking", "config", *FOUNDATIONS}, path


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
    "segtune.training.baseline",
    "segtune.data.stats",
    "segtune.data.convert_floodnet",
    "dashboards.report",
)


@pytest.mark.slow  # over 10 s on 2 cores: make test, not make check
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
        "import json, sys, concurrent.futures, threading, segtune.run, segtune.sweep.ray_init, "
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
        "import importlib\nfrom segtune.sweep.preflight import PREFLIGHT_IMPORTS\n"
        "for name in PREFLIGHT_IMPORTS: importlib.import_module(name)\n"
    )
    assert len(ray_init) > 50 and len(preflight) > 1000  # both import plenty on their own
    assert ray_init & preflight == set()


def _collected(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return [line for line in done.stdout.splitlines() if "::" in line]


@pytest.mark.slow  # over 10 s on 2 cores: make test, not make check
def test_the_fast_tier_leaves_out_what_starts_ray_and_keeps_the_rest() -> None:
    """`make check`'s selection, read from the Makefile, over tests/conftest.py's markers: every
    test of test_export (its module fixture runs a sweep) and test_sweep's sweeps are left out,
    test_config's checks (which start nothing) stay."""
    make = (REPO / "Makefile").read_text()
    selection = re.search(r'^check:.*\n\t.*pytest -q -m "([^"]+)"', make, re.MULTILINE)
    assert selection is not None, "make check selects by marker"
    files = ("tests/test_export.py", "tests/test_sweep.py", "tests/test_config.py")
    fast = _collected("-m", selection.group(1), *files)
    every = _collected(*files)
    assert not [t for t in fast if t.startswith("tests/test_export.py::")]
    assert "tests/test_sweep.py::test_sweep_contract_failure_and_retry" in every
    assert "tests/test_sweep.py::test_sweep_contract_failure_and_retry" not in fast
    assert "tests/test_config.py::test_overrides_are_typed_and_nested" in fast
    assert len([t for t in fast if t.startswith("tests/test_config.py::")]) > 50
