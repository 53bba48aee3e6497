"""A finished sweep's recording for the replay bench (`segtune.sweep.replay`): each trial's
per-epoch val_miou and its model costs, read from MLflow, written to a compact JSON file, and
written back from that file into an MLflow store (the bench's committed fixture is one)."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from segtune.config.names import (
    CONFIG_LABEL_TAG,
    MODEL_COSTS,
    ROLE_TAG,
    ROLE_TRIAL,
    SWEEP_ARTIFACT,
)
from segtune.errors import ConfigError
from segtune.tracking.query import PARAM_PREFIX, load_sweep_data
from segtune.tracking.runs import start_sweep_run

CURVE = "val_miou"


@dataclass(frozen=True)
class Trial:
    """One trial as the replay sees it: its name, val_miou by epoch, its model's costs."""

    label: str
    params: dict[str, str]
    curve: tuple[float, ...]
    costs: dict[str, float]


@dataclass(frozen=True)
class Recording:
    """A sweep's trials and its resolved sweep file (what its tune section asked for)."""

    experiment: str
    sweep_yaml: str
    trials: tuple[Trial, ...]

    @property
    def tune(self) -> dict[str, Any]:
        return (yaml.safe_load(self.sweep_yaml) or {}).get("tune") or {}

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "sweep_yaml": self.sweep_yaml,
            "trials": [
                {"label": t.label, "params": t.params, CURVE: list(t.curve), "costs": t.costs}
                for t in self.trials
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recording:
        trials = tuple(
            Trial(t["label"], dict(t["params"]), tuple(t[CURVE]), dict(t["costs"]))
            for t in data["trials"]
        )
        return cls(data["experiment"], data["sweep_yaml"], trials)


def read_recording(experiment: str, tracking_uri: str | None = None) -> Recording:
    """The newest sweep of `experiment`: its finished trials with a val_miou curve."""
    data = load_sweep_data(experiment, tracking_uri, history_keys=(CURVE,))
    client = MlflowClient(data.tracking_uri)
    sweep_run = str(data.sweeps["run_id"].iloc[0])
    with tempfile.TemporaryDirectory() as folder:
        sweep_yaml = Path(client.download_artifacts(sweep_run, SWEEP_ARTIFACT, folder)).read_text()
    trials = []
    for _, row in data.table.iterrows():
        curve = data.history(str(row["run_id"]), CURVE).sort_index()
        if row["status"] != "FINISHED" or curve.empty:
            continue
        costs = {k: float(row[k]) for k in MODEL_COSTS if k in row and not math.isnan(row[k])}
        params = {
            c.removeprefix(PARAM_PREFIX): str(row[c])
            for c in data.param_columns
            if isinstance(row[c], str)
        }
        trials.append(Trial(str(row["label"]), params, tuple(map(float, curve)), costs))
    if not trials:
        raise ConfigError(f"experiment {experiment!r}: no finished trial with a {CURVE} curve")
    return Recording(experiment, sweep_yaml, tuple(trials))


def write_json(recording: Recording, path: Path) -> None:
    path.write_text(json.dumps(recording.to_json(), separators=(",", ":")) + "\n")


def load_json(path: Path) -> Recording:
    return Recording.from_json(json.loads(path.read_text()))


def write_to_mlflow(recording: Recording, tracking_uri: str) -> str:
    """A sweep run and its trial runs as segtune logs them (params, the curve by epoch, the
    costs), so that `read_recording` and the bench's `--experiment` read it back; the sweep
    run's id."""
    client = MlflowClient(tracking_uri)
    parent = start_sweep_run(client, recording.experiment, recording.experiment,
                             recording.sweep_yaml)  # fmt: skip
    experiment_id = client.get_run(parent).info.experiment_id
    for t in recording.trials:
        run = client.create_run(
            experiment_id,
            run_name=t.label,
            tags={ROLE_TAG: ROLE_TRIAL, MLFLOW_PARENT_RUN_ID: parent, CONFIG_LABEL_TAG: t.label},
        )
        metrics = [Metric(CURVE, v, 0, step) for step, v in enumerate(t.curve)]
        metrics += [Metric(k, v, 0, 0) for k, v in t.costs.items()]
        params = [Param(k, v) for k, v in t.params.items()]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        client.set_terminated(run.info.run_id)
    client.set_terminated(parent)
    return parent
