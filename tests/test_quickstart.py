"""The quickstart teaches the right lesson: every one of its models learns.

`sweeps/quickstart.yaml` as `make demo` runs it (its synthetic set, epochs, learning rate,
output stride and decoder), only with its own store and storage, and a smaller benchmark input:
the cost stage does not touch what a model learns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from segtune.config.names import ROLE_SWEEP, ROLE_TAG, ROLE_TRIAL

QUICKSTART = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"
MARGIN = 0.05  # issue 13: each model beats the colour-only floor by at least this


@pytest.mark.launch  # the whole quickstart, about 3 minutes on 2 cores: make test-cluster, and CI
def test_every_quickstart_model_beats_the_colour_floor(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "segtune.run",
            str(QUICKSTART),
            "--tracking-uri",
            uri,
            "--no-report",
            "--set",
            f"data.root={tmp_path / 'data'}",
            "--set",
            f"tune.storage_path={tmp_path / 'ray'}",
            "--set",
            "bench.input=128x96",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    (parent,) = client.search_runs(
        [experiment.experiment_id], f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'"
    )
    floor = parent.data.metrics["floor_miou"]
    assert 0.1 < floor < 0.5  # the nearest-mean-colour classifier on 16 validation images
    trials = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'")
    scores = {
        f"{t.data.params['arch']}-{t.data.params['backbone']}": t.data.metrics["best_val_miou"]
        for t in trials
        if t.info.status == "FINISHED"
    }
    assert set(scores) == {
        "unet-none",
        "deeplabv3plus-resnet18",
        "deeplabv3plus-vgg11_bn",
        "deeplabv3plus-mobilenet_v3_small",
    }, scores
    below = {model: round(s, 3) for model, s in scores.items() if s < floor + MARGIN}
    assert not below, f"floor {floor:.3f}: {below} do not beat it by {MARGIN}"
