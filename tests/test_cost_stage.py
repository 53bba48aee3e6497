"""The cost stage (segtune.cost_stage) and its table (segtune.tracking.costs), on real models
and a real MLflow store: one timing per architecture signature, never a silent busy figure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from segtune import cost_stage
from segtune.config import trial_config
from segtune.cost_stage import MAX_OTHER_CORES, NodeKind, measure_missing, signature
from segtune.models import build_model
from segtune.sweepfile import BenchSection
from segtune.tracking.costs import NOISY_TAG, find_cost
from segtune.tracking.names import COST_EXPERIMENT, COST_TAG_PREFIX

UNET = {"arch": "unet", "backbone": "none", "unet_min_channels": 8, "unet_max_channels": 32,
        "unet_depth": 2, "pretrained": "none"}  # fmt: skip
BENCH = BenchSection(input="320x240", threads=1, repeats=5, warmup=2)


def count_cost_runs(client: MlflowClient) -> int:
    experiment = client.get_experiment_by_name(COST_EXPERIMENT)
    return len(client.search_runs([experiment.experiment_id])) if experiment else 0


def test_the_signature_is_the_structure_and_the_conditions_not_the_weights() -> None:
    kind = NodeKind("some CPU", "")
    first, second = build_model(trial_config(UNET)), build_model(trial_config(UNET))
    assert any((a != b).any() for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert signature(first, BENCH, kind) == signature(second, BENCH, kind)
    wider = build_model(trial_config({**UNET, "unet_min_channels": 16}))
    others = {
        signature(wider, BENCH, kind),
        signature(first, BENCH.model_copy(update={"threads": 2}), kind),
        signature(first, BENCH.model_copy(update={"input": "96x64"}), kind),
        signature(first, BENCH, NodeKind("another CPU", "")),
        signature(first, BENCH, NodeKind("some CPU", "NVIDIA H100")),
    }
    assert len(others) == 5 and signature(first, BENCH, kind) not in others


def test_the_table_times_each_network_once(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    configs = [trial_config({**UNET, "seed": s, "lr": lr}) for s in (0, 1) for lr in (0.1, 0.01)]
    configs.append(trial_config({**UNET, "unet_min_channels": 4}))
    quieted: list[str] = []  # the driver's hook before timing: once, and only if it times
    first = measure_missing(configs, BENCH, uri, lambda: quieted.append("first"))
    client = MlflowClient(uri)
    assert len(first) == 2 and count_cost_runs(client) == 2
    assert {c["source"] for c in first.values()} == {"measured"}
    again = measure_missing(configs, BENCH, uri, lambda: quieted.append("again"))
    # a timing that stayed noisy (a busy machine) is timed again; a steady one never
    noisy = {key for key, cost in first.items() if "noisy" in cost}
    assert quieted == ["first"] + ["again"] * bool(noisy)
    assert count_cost_runs(client) == 2 + len(noisy)
    assert {key: cost["source"] for key, cost in again.items()} == {
        key: "measured" if key in noisy else "reused" for key in first
    }
    for key, cost in first.items():
        if key in noisy:  # its reason named, and a new timing in its own cost run
            assert cost["noisy"] and again[key]["run_id"] != cost["run_id"]
            continue
        assert again[key]["run_id"] == cost["run_id"]
        assert again[key]["infer_ms_cpu"] == pytest.approx(cost["infer_ms_cpu"])
        assert again[key]["bench_threads"] == 1 and again[key]["bench_input"] == "320x240"
        assert "infer_ms_gpu" not in cost and cost["gpu_skip_reason"]  # no GPU: no number
        # conditions of a steady timing
        assert cost["cpu_cv"] <= cost_stage.MAX_CV and "noisy" not in cost


@contextmanager
def busy_cores(seconds: float) -> Iterator[None]:
    """Every core of this machine kept busy by another process for `seconds`."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)  # running before the timing starts
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_a_busy_machine_is_waited_out_or_marked_noisy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    configs = [trial_config(UNET)]

    # a load that stays through every try: recorded, with the noisy mark and its figures
    monkeypatch.setattr(cost_stage, "RETRY_WAIT_S", 0.5)
    with busy_cores(120):
        (noisy,) = measure_missing(configs, BENCH, uri).values()
    assert noisy["cpu_attempts"] == cost_stage.ATTEMPTS
    assert "other processes kept" in noisy["noisy"] and noisy["other_cores"] > MAX_OTHER_CORES
    run = client.get_run(noisy["run_id"])
    assert "other processes kept" in run.data.tags[NOISY_TAG]
    for key in ("other_cores", "load_before", "load_after", "cpu_cv", "cpu_attempts"):
        assert run.data.tags[f"{COST_TAG_PREFIX}{key}"], key

    # a load that ends while the stage waits: timed again after it, steady, nothing marked
    monkeypatch.setattr(cost_stage, "RETRY_WAIT_S", 4.0)
    with busy_cores(3):
        (steady,) = measure_missing(configs, BENCH, uri).values()  # the noisy one is not reused
    assert steady["source"] == "measured" and "noisy" not in steady, steady.get("noisy")
    assert steady["cpu_attempts"] >= 2 and steady["other_cores"] <= MAX_OTHER_CORES
    # the table now answers with the steady timing
    sig = steady["signature"]
    assert find_cost(client, sig)[0] == steady["run_id"]
    assert count_cost_runs(client) == 2
