"""What a sweep's `tune.constraints` kept from training, for the summary and the report: the
configurations removed before the trials started (an artifact of the sweep run), and the
sampled ones that ended at once (trial runs tagged `segtune.infeasible`)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from segtune.config.names import EXCLUDED_ARTIFACT


def log_excluded(
    client: MlflowClient, sweep_run_id: str, excluded: Sequence[dict[str, str]]
) -> None:
    """Keep on the sweep run each removed configuration's `label` and `reason`."""
    client.log_text(sweep_run_id, json.dumps(list(excluded), indent=1), EXCLUDED_ARTIFACT)


def load_excluded(client: MlflowClient, sweep_run_id: str) -> list[dict[str, str]]:
    """The configurations `log_excluded` kept on the sweep run; none where it kept nothing."""
    if EXCLUDED_ARTIFACT not in {f.path for f in client.list_artifacts(sweep_run_id)}:
        return []
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(sweep_run_id, EXCLUDED_ARTIFACT, folder)
        return json.loads(Path(path).read_text())


def excluded_lines(
    tracking_uri: str, trials: pd.DataFrame, sweep_run_ids: Iterable[str]
) -> list[str]:
    """One line per configuration the constraints kept from training, with the reason."""
    client = MlflowClient(tracking_uri)
    lines = [
        f"not trained (tune.constraints): {entry['label']}: {entry['reason']}"
        for run_id in sweep_run_ids
        for entry in load_excluded(client, run_id)
    ]
    if "infeasible" in trials:
        infeasible = trials[trials["infeasible"].fillna("") != ""]
        lines += [
            f"infeasible, ended before its first epoch: {row['label']}: {row['infeasible']}"
            for _, row in infeasible.iterrows()
        ]
    return lines
