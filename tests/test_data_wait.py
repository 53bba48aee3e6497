"""The loader's share of every epoch (`data_wait_s`, `data_wait_frac`), the input-bound flag of
the summary, and `python -m segtune.bench loader`.

The data are large images (640x480) cut into small crops (32 px) for a one-level UNet: decoding
and the `strong` augmentation cost more than the step, as on a GPU that outruns its loader.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from segtune.config.names import DATA_WAIT_MEAN, INPUT_BOUND_FIX, ROLE_TAG
from segtune.config.trial import DataConfig, trial_config
from segtune.data.pipeline import build_data
from segtune.models import build_model
from segtune.training.engine import fit
from segtune.training.losses import build_loss
from tests.test_sweep import run, write_sweep

FAST_MODEL = {
    "arch": "unet",
    "backbone": "none",
    "unet_min_channels": 4,
    "unet_max_channels": 8,
    "unet_depth": 1,
    "image_size": 32,
    "batch_size": 4,
    "augment": "strong",
    "epochs": 2,
}


@pytest.fixture(scope="module")
def large_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segtune.data.synthetic import generate

    root = tmp_path_factory.mktemp("large")
    generate(root, n_train=32, n_test=2, size=(640, 480), seed=0, progress=False)
    return root


def _waits(root: Path, cache: bool, num_workers: int) -> list[float]:
    """The data_wait_frac of each epoch of a three-epoch fit() with one torch thread, as a
    trial with `cpu: 1` trains."""
    cfg = trial_config({**FAST_MODEL, "epochs": 3, "num_workers": num_workers})
    data = build_data(DataConfig(root=str(root), cache=cache), cfg, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, loss = build_model(cfg), build_loss("ce")
        result = fit(model, data.train_loader, data.val_loader, cfg, loss, device="cpu")
    finally:
        torch.set_num_threads(threads)
    for epoch in result.history:
        assert epoch["data_wait_s"] > 0 and 0 < epoch["data_wait_frac"] < 1
    waits = [epoch["data_wait_frac"] for epoch in result.history]
    assert result.summary()[DATA_WAIT_MEAN] == pytest.approx(sum(waits) / len(waits))
    return waits


def test_the_cache_and_workers_cut_the_wait(large_images: Path) -> None:
    """A value check, not a timing: decoding and augmenting in the step's own process against
    the cache and two workers that prepare batches while it trains. The last epochs compare:
    the first one also waits for the workers to start."""
    alone = _waits(large_images, cache=False, num_workers=0)
    helped = _waits(large_images, cache=True, num_workers=2)
    print(f"data_wait_frac by epoch: no cache, no workers {alone}; cache, 2 workers {helped}")
    assert helped[-1] < alone[-1]


def test_an_input_bound_trial_is_flagged(large_images: Path, tmp_path: Path) -> None:
    """`strong` without cache and workers: the trial's run holds each epoch's wait, and the
    summary names it input-bound with what to change."""
    sweep = write_sweep(
        tmp_path / "starved.yaml",
        large_images,
        data={"cache": False},
        train={**FAST_MODEL, "num_workers": 0},
    )
    proc = run(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("starved")
    (trial,) = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")
    waits = client.get_metric_history(trial.info.run_id, "data_wait_frac")
    seconds = client.get_metric_history(trial.info.run_id, "data_wait_s")
    assert sorted(m.step for m in waits) == sorted(m.step for m in seconds) == [0, 1]
    assert all(m.value > 0.3 for m in waits), [m.value for m in waits]
    mean = trial.data.metrics[DATA_WAIT_MEAN]
    assert mean == pytest.approx(sum(m.value for m in waits) / 2)
    print(f"data_wait_frac of the starved trial: {[round(m.value, 2) for m in waits]}")
    label = trial.info.run_name
    assert re.search(rf"^{re.escape(label)} .*input-bound$", proc.stdout, re.M), proc.stdout
    assert f"input-bound {label}: waited {mean:.0%} of its epochs" in proc.stdout
    assert INPUT_BOUND_FIX in proc.stdout


def test_bench_loader_prints_a_rate_per_augmentation(large_images: Path, tmp_path: Path) -> None:
    sweep = write_sweep(
        tmp_path / "rates.yaml",
        large_images,
        data={"cache": True},
        train={"image_size": 64, "batch_size": 4},
        search_space={"augment": {"grid_search": ["none", "basic", "strong"]}},
    )
    args = ["loader", str(sweep), "--images", "16", "--repeats", "2", "--warmup", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "segtune.bench", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("#") and "cores" in lines[0] and "threads" in lines[0]
    rows = [re.match(r"(\w+) +(\d+) +(on|off) +([\d.]+) +(\d+)%$", line) for line in lines[2:5]]
    assert [(m[1], m[2], m[3]) for m in rows if m] == [
        ("none", "64", "on"),
        ("basic", "64", "on"),
        ("strong", "64", "on"),
    ], proc.stdout
    assert all(float(m[4]) > 0 for m in rows if m)
