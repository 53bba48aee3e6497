"""`python -m segtune.bench sweep`: a sweep run as a user runs it, several times, and the time
account each run left on its sweep run (segtune.tracking.timing), with the median.

`warm` runs share one tracking store that an untimed first run has filled, so their cost stage
finds every model in the cost table, as a user's second sweep does; `cold` runs each start from
an empty store and time every model again, as a first sweep does.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from segtune.config.names import ROLE_SWEEP, ROLE_TAG
from segtune.config.sweep import load_sweep
from segtune.errors import SegtuneError
from segtune.models.cost import cpu_name
from segtune.tracking.timing import read_account

log = logging.getLogger(__name__)

COLUMNS = {  # the account's keys, as the table titles them
    "wall_s": "wall s",
    "efficiency": "efficiency",
    "train_s": "training",
    "checks_s": "start-up",
    "start_s": "Ray start, pre-flight",
    "cost_stage_s": "cost stage",
    "nodes_s": "node checks",
    "tuner_s": "trials",
    "stop_s": "Ray stop",
    "report_s": "report",
    "setup_s": "trial setup",
    "trial_cost_s": "trial cost",
    "eval_s": "evaluation",
    "idle_s": "idle",
}


def _latest_sweep_run(uri: str, experiment: str) -> str:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found
        else []
    )
    if not runs:
        raise SegtuneError(f"no sweep run of experiment {experiment!r} at {uri}")
    return runs[0].info.run_id


def _run_once(sweep: Path, sets: Sequence[str], folder: Path, log_name: str) -> float:
    """One `python -m segtune.run`, its tracking store and run storage in `folder`; its wall
    seconds as seen from outside (interpreter start included)."""
    command = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri",
               f"sqlite:///{folder / 'mlflow.db'}", "--set",
               f"tune.storage_path={folder / 'runs'}", *(a for s in sets for a in ("--set", s))]  # fmt: skip
    started = time.perf_counter()
    with open(folder / log_name, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = (folder / log_name).read_text()[-2000:]
        raise SegtuneError(f"{' '.join(command)} exited {done.returncode}:\n{tail}")
    return wall


def bench_sweep(sweep: Path, sets: Sequence[str], repeats: int, cold: bool) -> pd.DataFrame:
    """One row per timed run (the account and the outside wall time), then the median."""
    experiment = load_sweep(sweep, list(sets)).experiment
    rows = []
    with tempfile.TemporaryDirectory(prefix="st-bench-") as tmp:
        shared = Path(tmp) / "shared"
        if not cold:
            shared.mkdir()
            log.info("untimed first run: fills the cost table")
            _run_once(sweep, sets, shared, "prime.log")
        for i in range(1, repeats + 1):
            folder = shared if not cold else Path(tmp) / f"run{i}"
            folder.mkdir(exist_ok=True)
            load = os.getloadavg()[0]
            outside = _run_once(sweep, sets, folder, f"run{i}.log")
            uri = f"sqlite:///{folder / 'mlflow.db'}"
            figures = read_account(MlflowClient(uri), _latest_sweep_run(uri, experiment))
            rows.append({"run": str(i), "load": load, "outside s": outside, **figures})
            log.info("run %d/%d: %.1f s, efficiency %.0f%%", i, repeats, outside,
                     100 * figures.get("efficiency", 0))  # fmt: skip
    table = pd.DataFrame(rows)
    median = {"run": "median", **{c: statistics.median(table[c]) for c in table if c != "run"}}
    return pd.concat([table, pd.DataFrame([median])], ignore_index=True)


def print_bench(table: pd.DataFrame, sweep: Path, sets: Sequence[str], cold: bool) -> None:
    import torch

    print(
        f"# {sweep} {' '.join(sets)} | cost table {'empty each run' if cold else 'filled'} | "
        f"{os.cpu_count()} CPUs ({cpu_name()}) | torch {torch.__version__} | seconds; "
        "efficiency = training / (wall x slots)"
    )
    shown = table[["run", "load", "outside s", *(c for c in COLUMNS if c in table)]].rename(
        columns=COLUMNS
    )
    shown["efficiency"] = shown["efficiency"].map("{:.0%}".format)
    print(shown.to_string(index=False, float_format="{:.1f}".format))
