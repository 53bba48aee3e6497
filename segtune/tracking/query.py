"""Reading a sweep back from MLflow into tables: what the report draws and what export chooses
from, read from MLflow and nothing else (so it works against a remote server).

One row per trial of the chosen sweep(s): params (as `params.<key>`, strings as MLflow holds
them), every metric's latest value under its own name, status and error, run ids. Per-epoch
histories come in a long table (run_id, key, step, value).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from segtune.config.names import (
    CONFIG_LABEL_TAG,
    COST_TAG_PREFIX,
    EARLY_STOP_TAG,
    ERROR_TAG,
    FLOOR_METRIC,
    INFEASIBLE_TAG,
    LABEL_TAG,
    NODE_TAG,
    OBJECTIVE,
    REUSED_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    SWEEP_TAG,
    TRIAL_ID_TAG,
)
from segtune.errors import SegtuneError
from segtune.tracking.address import check_tracking_uri, public_uri, resolve_tracking_uri

log = logging.getLogger(__name__)

PARAM_PREFIX = "params."
SEED_PARAM = "seed"
HISTORY_KEYS = ("train_loss", "val_loss", "val_miou")
INFO_COLUMNS = (
    "run_id",
    "run_name",
    "label",
    "status",
    "error",
    "early_stopped",
    "infeasible",
    "sweep_run_id",
    "sweep",
    "trial_id",
    "node",
    "start_time",
    "end_time",
    "config",
    "config_label",
    "cost_source",
    "cost_noisy",
    "floor_miou",
)


class TrackingError(SegtuneError):
    """MLflow holds nothing to read: unknown experiment, no sweep, unknown run, no server."""


@dataclass
class SweepData:
    """The trials of one or several sweeps of an experiment, as MLflow holds them."""

    tracking_uri: str
    experiment: str
    experiment_id: str
    sweeps: pd.DataFrame  # run_id, run_name, sweep, start_time, status: newest first
    table: pd.DataFrame  # one row per trial
    histories: pd.DataFrame  # run_id, key, step, value
    param_columns: list[str] = field(default_factory=list)
    metric_columns: list[str] = field(default_factory=list)

    def history(self, run_id: str, key: str) -> pd.Series:
        """Values of `key` by step (epoch) for one trial; empty when never logged."""
        h = self.histories
        rows = h[(h["run_id"] == run_id) & (h["key"] == key)]
        return pd.Series(rows["value"].to_numpy(), index=rows["step"].to_numpy(), name=key)

    def varying_params(self, exclude: Iterable[str] = ()) -> list[str]:
        """Param columns whose value differs between trials: what a sweep compared."""
        skip = {PARAM_PREFIX + k for k in exclude}
        return [
            c
            for c in self.param_columns
            if c not in skip and self.table[c].fillna("").nunique(dropna=False) > 1
        ]


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> Iterator[Run]:
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def _time(ms: int | None) -> pd.Timestamp:
    return pd.to_datetime(ms, unit="ms") if ms else pd.NaT


def _experiment(client: MlflowClient, name: str, uri: str) -> str:
    try:
        experiment = client.get_experiment_by_name(name)
    except MlflowException as exc:
        raise TrackingError(
            f"cannot read MLflow at {public_uri(uri)}: {exc.message.splitlines()[0]}"
        ) from None
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments())
        raise TrackingError(
            f"experiment {name!r} not found at tracking URI {public_uri(uri)} "
            f"(experiments there: {', '.join(known) or 'none'}); "
            "pass --tracking-uri or the sweep's experiment name"
        )
    return experiment.experiment_id


def _sweep_runs(
    client: MlflowClient, experiment: str, experiment_id: str, sweep_run_id: str | None, all_: bool
) -> list[Run]:
    """The parent runs to report: the given one, every one, or the newest."""
    if sweep_run_id:
        try:
            run = client.get_run(sweep_run_id)
        except MlflowException:
            raise TrackingError(f"--run-id {sweep_run_id}: no such MLflow run") from None
        if run.info.experiment_id != experiment_id or run.data.tags.get(ROLE_TAG) != ROLE_SWEEP:
            raise TrackingError(
                f"--run-id {sweep_run_id}: not a sweep run (tag {ROLE_TAG}={ROLE_SWEEP}) "
                f"of experiment {experiment!r}"
            )
        return [run]
    sweeps = list(_search(client, experiment_id, f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'"))
    if not sweeps:
        raise TrackingError(
            f"experiment {experiment!r} has no sweep run (tag {ROLE_TAG}={ROLE_SWEEP}); "
            "run `python -m segtune.run SWEEP.yaml` first"
        )
    return sweeps if all_ else sweeps[:1]


def _trial_row(run: Run, sweep: Run) -> dict[str, object]:
    tags = run.data.tags
    row: dict[str, object] = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or tags.get(LABEL_TAG) or run.info.run_id[:8],
        "status": run.info.status,
        "error": tags.get(ERROR_TAG, ""),
        "early_stopped": tags.get(EARLY_STOP_TAG, ""),
        # ended before training: its architecture breaks the sweep's tune.constraints
        "infeasible": tags.get(INFEASIBLE_TAG, ""),
        "sweep_run_id": sweep.info.run_id,
        "sweep": sweep.data.tags.get(SWEEP_TAG, sweep.info.run_name),
        "trial_id": tags.get(TRIAL_ID_TAG, ""),
        "node": tags.get(NODE_TAG, ""),
        "start_time": _time(run.info.start_time),
        "end_time": _time(run.info.end_time),
        "config_label": tags.get(CONFIG_LABEL_TAG) or run.info.run_name,
        # where its cost came from (segtune.sweep.cost_stage), and why it is noisy if it is
        "cost_source": tags.get(f"{COST_TAG_PREFIX}source", ""),
        "cost_noisy": tags.get(f"{COST_TAG_PREFIX}noisy", ""),
        # the colour-only floor of the trial's sweep (absent from sweeps before segtune kept it)
        "floor_miou": sweep.data.metrics.get(FLOOR_METRIC, math.nan),
    }
    row.update({PARAM_PREFIX + k: v for k, v in run.data.params.items()})
    row.update(run.data.metrics)
    return row


def config_key(row: pd.Series, param_columns: Sequence[str]) -> str:
    """Every param but the seed: trials with the same key are seeds of one configuration."""
    return ";".join(
        f"{c[len(PARAM_PREFIX) :]}={row[c]}"
        for c in param_columns
        if c != PARAM_PREFIX + SEED_PARAM and pd.notna(row[c])
    )


def _short_value(value: object) -> str:
    """A param for a label: 0.000395123 reads as 0.000395."""
    try:
        number = float(str(value))
    except ValueError:
        return str(value)
    return f"{number:.3g}" if "." in str(value) or "e" in str(value).lower() else str(value)


def unique_labels(table: pd.DataFrame, param_columns: Sequence[str]) -> list[str]:
    """Run names, made unique by the params that tell equal names apart (seeds, lr, sweeps)."""
    labels = table["run_name"].astype(str).tolist()
    for name in set(labels):
        idx = [i for i, label in enumerate(labels) if label == name]
        if len(idx) < 2:
            continue
        rows = table.iloc[idx]
        differ = [c for c in param_columns if rows[c].fillna("").nunique() > 1]
        for i, (_, row) in zip(idx, rows.iterrows(), strict=True):
            extra = " ".join(f"{c[len(PARAM_PREFIX) :]}={_short_value(row[c])}" for c in differ)
            labels[i] = f"{name} {extra}".strip()
    counts = pd.Series(labels).value_counts()
    return [
        f"{label} #{run_id[:6]}" if counts[label] > 1 else label
        for label, run_id in zip(labels, table["run_id"], strict=True)
    ]


def _histories(client: MlflowClient, runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame:
    rows = []
    for run in runs:
        for key in keys:
            if key not in run.data.metrics:
                continue
            for m in client.get_metric_history(run.info.run_id, key):
                rows.append((run.info.run_id, key, m.step, m.value, m.timestamp))
    frame = pd.DataFrame(rows, columns=["run_id", "key", "step", "value", "timestamp"])
    # a re-logged step (a resumed trial) keeps its newest value
    frame = frame.sort_values("timestamp").drop_duplicates(["run_id", "key", "step"], keep="last")
    return frame.sort_values(["run_id", "key", "step"]).drop(columns="timestamp")


def load_sweep_data(
    experiment: str,
    tracking_uri: str | None = None,
    sweep_run_id: str | None = None,
    all_sweeps: bool = False,
    history_keys: Sequence[str] = HISTORY_KEYS,
) -> SweepData:
    """The newest sweep of `experiment` (or `sweep_run_id`, or every sweep), trials and histories."""
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)  # one line in seconds, not MLflow's exception or minutes of retries
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment(client, experiment, uri)
    sweeps = _sweep_runs(client, experiment, experiment_id, sweep_run_id, all_sweeps)
    trials: list[Run] = []
    rows = []
    for sweep in sweeps:
        found = _search(
            client,
            experiment_id,
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{sweep.info.run_id}' "
            f"and tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'",
        )
        for run in found:
            trials.append(run)
            rows.append(_trial_row(run, sweep))
    if not rows:
        names = ", ".join(s.info.run_name for s in sweeps)
        raise TrackingError(
            f"sweep run(s) {names} of experiment {experiment!r} have no trial runs yet"
        )
    table = pd.DataFrame(rows)
    params = sorted(c for c in table.columns if c.startswith(PARAM_PREFIX))
    metrics = sorted(
        c for c in table.columns if c not in INFO_COLUMNS and not c.startswith(PARAM_PREFIX)
    )
    table = table.sort_values("start_time", kind="stable").reset_index(drop=True)
    table["config"] = [config_key(row, params) for _, row in table.iterrows()]
    table["label"] = unique_labels(table, params)
    firsts = table.drop_duplicates("config")
    firsts = firsts.assign(run_name=firsts["config_label"])
    no_seed = [c for c in params if c != PARAM_PREFIX + SEED_PARAM]
    names = dict(zip(firsts["config"], unique_labels(firsts, no_seed), strict=True))
    table["config_label"] = table["config"].map(names)
    table = table[[*INFO_COLUMNS, *params, *metrics]]
    sweep_table = pd.DataFrame(
        {
            "run_id": [s.info.run_id for s in sweeps],
            "run_name": [s.info.run_name for s in sweeps],
            "sweep": [s.data.tags.get(SWEEP_TAG, s.info.run_name) for s in sweeps],
            "start_time": [_time(s.info.start_time) for s in sweeps],
            "status": [s.info.status for s in sweeps],
        }
    )
    log.info(
        "%d trials in %d sweep(s) of experiment %r at %s", len(table), len(sweeps), experiment, uri
    )
    return SweepData(
        tracking_uri=uri,
        experiment=experiment,
        experiment_id=experiment_id,
        sweeps=sweep_table,
        table=table,
        histories=_histories(client, trials, history_keys),
        param_columns=params,
        metric_columns=metrics,
    )


def load_sweep_table(
    experiment: str,
    tracking_uri: str | None = None,
    sweep_run_id: str | None = None,
    all_sweeps: bool = False,
) -> pd.DataFrame:
    """One row per trial (params, latest metrics, status, run ids) of the chosen sweep(s)."""
    return load_sweep_data(
        experiment, tracking_uri, sweep_run_id, all_sweeps, history_keys=()
    ).table


def reused_runs(tracking_uri: str, sweep_run_ids: Iterable[str]) -> list[dict[str, object]]:
    """The earlier trial runs that warm starts of these sweep runs reused (REUSED_TAG): run id,
    experiment id, configuration label and objective, for the summary and the report."""
    client = MlflowClient(tracking_uri)
    found: list[dict[str, object]] = []
    for sweep_run_id in sweep_run_ids:
        ids = client.get_run(sweep_run_id).data.tags.get(REUSED_TAG, "")
        for run in (client.get_run(run_id) for run_id in filter(None, ids.split(","))):
            label = run.data.tags.get(CONFIG_LABEL_TAG) or run.info.run_name
            found.append({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                          "label": label, OBJECTIVE: run.data.metrics.get(OBJECTIVE, math.nan)})  # fmt: skip
    return found


def download_eval(tracking_uri: str, run_id: str, artifact_dir: str, dst: Path) -> Path | None:
    """Copy one artifact directory (or file) of a run into `dst`; None when the run has none."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = artifact_dir.rsplit("/", 1)[0] if "/" in artifact_dir else ""
    listed = {f.path for f in client.list_artifacts(run_id, parent or None)}
    if artifact_dir not in listed:
        return None
    target = dst / artifact_dir
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact_dir, str(dst)))


def metrics_at_step(
    tracking_uri: str, run_id: str, keys: Iterable[str], step: int
) -> dict[str, float]:
    """Each key's value at `step` (e.g. the per-class IoU of the best epoch), where logged."""
    client = MlflowClient(tracking_uri=tracking_uri)
    out = {}
    for key in keys:
        values = [m.value for m in client.get_metric_history(run_id, key) if m.step == step]
        if values:
            out[key] = values[-1]
    return out
