"""`python -m segtune.export --experiment NAME`: the best trial of a sweep as deployable files.

The trial is chosen from MLflow as the dashboards see it (`dashboards.data`): the best finished
trial by `--metric` (ties go to the smaller model, `size_mb`), within an optional `--budget`,
or the run named by `--run-id`. Its `checkpoints/best.pt` is downloaded through the MLflow
client, so a remote server's artifact proxy works, and loaded with `weights_only=True`.

The export folder runs without segtune's training code:

- `model.pt`: TorchScript (traced; every resize in the models follows the input's size, and
  the trace is checked against the checkpoint's model at sizes other than the traced one);
- `model.onnx`: ONNX with dynamic batch, height and width (torch.export-based exporter, the
  TorchScript-based one as a fallback), checked with onnxruntime;
- `best.pt` unchanged, `model_card.json` and `README.md` (classes, palette, input rules,
  metrics, cost, provenance), and `SHA256SUMS` over all of them, which `segtune.predict`
  verifies before it loads anything.

`--register NAME` also logs the TorchScript model with `mlflow.pytorch.log_model` (signature
and input example) in an export run nested under the trial's run, registers it as a new
version of NAME and tags that version with the trial's metrics.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from torch import nn

from dashboards.analysis import OBJECTIVE, Constraint, parse_budget, within_budget
from dashboards.data import load_sweep_data
from segtune.checkpoint import load_checkpoint
from segtune.cli import run_cli, setup_logging
from segtune.config import TrialConfig, trial_config
from segtune.errors import ConfigError, ModelError, SegtuneError
from segtune.models import build_model
from segtune.predict import (
    CARD_FILE,
    CARD_FORMAT,
    CHECKPOINT_FILE,
    CHECKSUMS_FILE,
    JIT_DEPRECATION,
    ONNX_FILE,
    README_FILE,
    TORCHSCRIPT_FILE,
    Forward,
    write_checksums,
)
from segtune.tracking import (
    CHECKPOINT_ARTIFACT,
    EARLY_STOP_TAG,
    ERROR_TAG,
    FINAL_METRICS,
    LABEL_TAG,
    NODE_TAG,
    ROLE_TAG,
    ROLE_TRIAL,
    SWEEP_ARTIFACT,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    finite_metrics,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
COST_KEYS = (
    "params_m",
    "size_mb",
    "gflops",
    "infer_ms_cpu",
    "infer_ms_gpu",
    "train_time_min",
    "train_img_s",
)
TRACE_HW = (96, 128)
# checked against the checkpoint's model: other sizes than the traced one, one of them not
# a multiple of 32, in a batch of two
VERIFY_HW = ((64, 96), (96, 128), (70, 90))
VERIFY_BATCH = 2
TOLERANCE = 1e-4
ROLE_EXPORT = "export"
SOURCE_RUN_TAG = "segtune.source_run_id"
# run tags that are no cost measurement conditions
_NOT_BENCH_TAGS = {
    ROLE_TAG,
    LABEL_TAG,
    SWEEP_TAG,
    ERROR_TAG,
    NODE_TAG,
    EARLY_STOP_TAG,
}


class ExportError(SegtuneError):
    """Nothing to export: no finished trial, no checkpoint, an output folder that is not ours."""


# --- which trial -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The trial run being exported and how it was chosen."""

    run: Run
    experiment: str
    selection: dict[str, Any]


def rank_trials(
    table: pd.DataFrame,
    metric: str = OBJECTIVE,
    mode: str = "max",
    constraints: Sequence[Constraint] = (),
    metric_columns: Sequence[str] | None = None,
    where: str = "this sweep",
) -> pd.DataFrame:
    """Finished trials that have `metric` and meet the budget, best first.

    Equal values go to the smaller model (`size_mb`; unknown sizes last), then the earlier trial.
    """
    if mode not in ("max", "min"):
        raise ConfigError(f"--mode {mode!r}: use max or min")
    done = table["status"] == "FINISHED"
    if not done.any():
        statuses = ", ".join(f"{n} {s}" for s, n in table["status"].value_counts().items())
        raise ExportError(
            f"{where} has no finished trial ({statuses}); wait for the sweep to finish, or "
            "fix what the trials' segtune.error tags say and run it again"
        )
    metric_columns = list(metric_columns if metric_columns is not None else table.columns)
    if metric not in metric_columns:
        raise ConfigError(
            f"--metric {metric!r}: no trial of {where} has it; metrics: {', '.join(metric_columns)}"
        )
    values = pd.to_numeric(table[metric], errors="coerce")
    finished = table[done & values.notna()]
    if finished.empty:
        raise ExportError(f"no finished trial of {where} has a value of {metric}")
    if constraints:
        finished = finished[within_budget(finished, constraints, metric_columns)]
        if finished.empty:
            budget = ",".join(str(c) for c in constraints)
            raise ExportError(
                f"no finished trial of {where} is within the budget {budget!r}; relax --budget"
            )
    size = (
        pd.to_numeric(finished["size_mb"], errors="coerce")
        if "size_mb" in finished.columns
        else pd.Series(np.nan, index=finished.index)
    )
    ordered = finished.assign(_metric=values[finished.index], _size=size.fillna(math.inf))
    ordered = ordered.sort_values(
        ["_metric", "_size", "start_time"], ascending=[mode == "min", True, True], kind="stable"
    )
    return ordered.drop(columns=["_metric", "_size"])


def has_checkpoint(client: MlflowClient, run_id: str) -> bool:
    folder = CHECKPOINT_ARTIFACT.rsplit("/", 1)[0]
    return CHECKPOINT_ARTIFACT in {f.path for f in client.list_artifacts(run_id, folder)}


def best_trial(
    client: MlflowClient,
    experiment: str,
    tracking_uri: str,
    metric: str = OBJECTIVE,
    mode: str = "max",
    budget: str | None = None,
    all_sweeps: bool = False,
) -> Source:
    """The best finished trial with a checkpoint (a trial stopped early by ASHA has none)."""
    data = load_sweep_data(experiment, tracking_uri, all_sweeps=all_sweeps, history_keys=())
    constraints = parse_budget(budget) if budget else []
    where = f"experiment {experiment!r}" + (" (all sweeps)" if all_sweeps else " (newest sweep)")
    ranked = rank_trials(data.table, metric, mode, constraints, data.metric_columns, where)
    for rank, (_, row) in enumerate(ranked.iterrows(), 1):
        if has_checkpoint(client, row["run_id"]):
            selection = {
                "by": "best",
                "metric": metric,
                "mode": mode,
                "budget": budget,
                "rank": rank,
                "candidates": len(ranked),
                "trials": len(data.table),
                "sweeps": "all" if all_sweeps else "newest",
            }
            return Source(client.get_run(row["run_id"]), experiment, selection)
        log.warning(
            "trial %s (%s %s) has no %s (stopped early?); taking the next one",
            row["label"],
            metric,
            row[metric],
            CHECKPOINT_ARTIFACT,
        )
    raise ExportError(f"none of the {len(ranked)} finished trials of {where} has a checkpoint")


def trial_by_id(client: MlflowClient, run_id: str, experiment: str | None) -> Source:
    """`--run-id`: a trial run picked by hand."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ExportError(f"--run-id {run_id}: no such MLflow run") from None
    name = client.get_experiment(run.info.experiment_id).name
    if experiment is not None and name != experiment:
        raise ExportError(f"--run-id {run_id}: a run of experiment {name!r}, not {experiment!r}")
    if run.data.tags.get(ROLE_TAG) != ROLE_TRIAL:
        raise ExportError(
            f"--run-id {run_id}: not a trial run (tag {ROLE_TAG}={ROLE_TRIAL}); pass the run of "
            "one trial, not of a sweep"
        )
    if not has_checkpoint(client, run_id):
        raise ExportError(
            f"--run-id {run_id} ({run.info.run_name}, {run.info.status}): no "
            f"{CHECKPOINT_ARTIFACT}; the trial did not finish or was stopped early"
        )
    if run.info.status != "FINISHED":
        log.warning("run %s is %s, not FINISHED", run_id, run.info.status)
    return Source(run, name, {"by": "run-id"})


# --- the model and its formats ---------------------------------------------------------------


def download_checkpoint(client: MlflowClient, run_id: str, dst: Path) -> Path:
    """`checkpoints/best.pt` through the MLflow client (works through a server's proxy)."""
    try:
        return Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dst)))
    except (MlflowException, OSError) as exc:
        raise ExportError(f"run {run_id}: cannot download {CHECKPOINT_ARTIFACT} ({exc})") from None


def checkpoint_model(ckpt: dict[str, Any]) -> tuple[nn.Module, TrialConfig]:
    """The network of a loaded best.pt in eval mode; its config with `pretrained: none`, since
    the checkpoint holds every weight (an ImageNet file need not exist here)."""
    cfg = trial_config({**ckpt["config"], "pretrained": "none"})
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ModelError(f"best.pt does not fit model {cfg.label()}: {exc}") from None
    return model.eval(), cfg


def random_input(hw: Sequence[int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Normalised-image-like input: standard normal noise, reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *hw, generator=generator)


@dataclass(frozen=True)
class Reference:
    """The checkpoint model's logits on random inputs, computed once for every format's check."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]

    @classmethod
    @torch.inference_mode()
    def of(cls, model: nn.Module, sizes: Sequence[Sequence[int]] = VERIFY_HW) -> Reference:
        inputs = [random_input(hw, VERIFY_BATCH, seed=i + 1) for i, hw in enumerate(sizes)]
        return cls(inputs, [model(x) for x in inputs])

    @torch.inference_mode()
    def max_abs_diff(self, candidate: Forward) -> float:
        """The largest |logit difference| of `candidate` over the reference inputs."""
        worst = 0.0
        for x, expected in zip(self.inputs, self.outputs, strict=True):
            got = candidate(x)
            if got.shape != expected.shape:
                raise ModelError(
                    f"exported model gave shape {tuple(got.shape)} for input {tuple(x.shape)}, "
                    f"expected {tuple(expected.shape)}"
                )
            worst = max(worst, float((got - expected).abs().max()))
        return worst


def _check(diff: float, what: str) -> None:
    if not diff <= TOLERANCE:
        raise ModelError(
            f"{what} differs from the checkpoint's model by {diff:.3g} (tolerance {TOLERANCE}) "
            f"on inputs of {', '.join(f'{h}x{w}' for h, w in VERIFY_HW)}; "
            "use --format to skip this format and report the model"
        )


def export_torchscript(
    model: nn.Module, path: Path, reference: Reference
) -> tuple[torch.jit.ScriptModule, float]:
    """Trace, save, reload, and compare the reloaded file with `model` at other sizes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATION)
        traced = torch.jit.trace(model, random_input(TRACE_HW), check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path)).eval()
    diff = reference.max_abs_diff(loaded)
    _check(diff, path.name)
    return loaded, diff


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "ONNX export needs onnx, onnxruntime and onnxscript: pip install 'segtune[export]', "
            "or pass --format torchscript"
        ) from None
    return onnx, onnxruntime


def _onnx_export(model: nn.Module, path: Path) -> str:
    """torch.export-based exporter with dynamic shapes; the TorchScript-based one if it fails."""
    example = (random_input(TRACE_HW),)
    names = {"input_names": ["image"], "output_names": ["logits"]}
    dims = {
        0: torch.export.Dim("batch", min=1, max=1024),
        2: torch.export.Dim("height", min=32, max=16384),
        3: torch.export.Dim("width", min=32, max=16384),
    }
    try:
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=True,
            dynamic_shapes=(dims,),
            external_data=False,
            verbose=False,
            **names,
        )
        return "dynamo"
    except Exception as exc:  # the exporter fails in many ways; the fallback covers them all
        log.warning(
            "the torch.export-based ONNX exporter failed (%s: %s); using the TorchScript-based one",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            dynamic_axes={"image": axes, "logits": axes},
            **names,
        )
    return "torchscript"


def export_onnx(model: nn.Module, path: Path, reference: Reference) -> tuple[dict[str, Any], float]:
    """Export, check the graph, and compare onnxruntime's output with `model`."""
    onnx, onnxruntime = _onnx_modules()
    exporter = _onnx_export(model, path)
    onnx.checker.check_model(str(path))
    opset = next(
        (o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")), None
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    diff = reference.max_abs_diff(forward)
    _check(diff, path.name)
    return {"exporter": exporter, "opset": opset, "onnxruntime": onnxruntime.__version__}, diff


# --- card, README, folder --------------------------------------------------------------------


def _public_uri(uri: str) -> str:
    """The tracking URI without credentials, fit for a file that travels."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def _sweep_info(client: MlflowClient, run: Run, dst: Path) -> dict[str, Any]:
    """The parent sweep's name, run id and `data` section (from its sweep.yaml), where known."""
    parent_id = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    if not parent_id:
        return {}
    info: dict[str, Any] = {"run_id": parent_id}
    try:
        parent = client.get_run(parent_id)
        info["name"] = parent.data.tags.get(SWEEP_TAG, parent.info.run_name)
        sweep = yaml.safe_load(
            Path(client.download_artifacts(parent_id, SWEEP_ARTIFACT, str(dst))).read_text()
        )
        info["data"] = sweep.get("data", {}) if isinstance(sweep, dict) else {}
    except (MlflowException, OSError, yaml.YAMLError) as exc:
        log.warning("sweep run %s: cannot read its %s (%s)", parent_id, SWEEP_ARTIFACT, exc)
    return info


def input_rule(resize: str, multiple: int) -> str:
    """The trial's evaluation geometry (data.eval_resize) in words."""
    if resize == "resize":
        return (
            f"resize (bilinear) each side to the nearest multiple of {multiple}, then resize "
            "the output back"
        )
    if resize == "none":
        return "the whole image as it is"
    return (
        f"pad at the bottom and right with black (0) to a multiple of {multiple} before "
        "normalising, then crop the output back"
    )


def model_card(
    source: Source,
    ckpt: dict[str, Any],
    cfg: TrialConfig,
    sweep: dict[str, Any],
    tracking_uri: str,
    files: dict[str, str | None],
    verification: dict[str, Any],
) -> dict[str, Any]:
    """Everything a user of the files needs, machine-readable."""
    run = source.run
    # the checkpoint holds the best epoch's metrics; the run's latest values are the last epoch's
    finals = {k: v for k, v in run.data.metrics.items() if k in FINAL_METRICS}
    recorded = {**finite_metrics(finals), **finite_metrics(ckpt["metrics"])}
    data = dict(sweep.get("data", {}))
    try:
        version = importlib.metadata.version("segtune")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": CARD_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "label": cfg.label(),
            "arch": cfg.arch,
            "backbone": cfg.backbone,
            "aspp": cfg.aspp if cfg.arch != "unet" else None,
            "config": ckpt["config"],
        },
        "files": files,
        "classes": [
            {"id": i, "name": name, "color": list(color)}
            for i, (name, color) in enumerate(
                zip(ckpt["class_names"], ckpt["palette"], strict=True)
            )
        ],
        "ignore_index": ckpt.get("ignore_index", 255),
        "input": {
            "name": "image",
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB",
            "normalization": "(x - 255 * mean) / (255 * std) on 0..255 pixel values",
            "mean": list(ckpt["mean"]),
            "std": list(ckpt["std"]),
            "resize": data.get("eval_resize", "pad"),
            "multiple": cfg.eval_multiple,
            "rule": input_rule(data.get("eval_resize", "pad"), cfg.eval_multiple),
        },
        "output": {
            "name": "logits",
            "shape": ["batch", len(ckpt["class_names"]), "height", "width"],
            "meaning": "class scores at the input size; argmax over dim 1 gives class ids",
        },
        "metrics": {k: v for k, v in recorded.items() if k not in COST_KEYS},
        "cost": {
            **{k: recorded[k] for k in COST_KEYS if k in recorded},
            "conditions": {
                k.removeprefix("segtune."): v
                for k, v in sorted(run.data.tags.items())
                if k.startswith("segtune.") and k not in _NOT_BENCH_TAGS
            },
        },
        "source": {
            "tracking_uri": _public_uri(tracking_uri),
            "experiment": source.experiment,
            "experiment_id": run.info.experiment_id,
            "sweep": sweep.get("name"),
            "sweep_run_id": sweep.get("run_id"),
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "trial_id": run.data.tags.get(TRIAL_ID_TAG),
            "status": run.info.status,
            "selection": source.selection,
        },
        "data": {
            **data,
            "note": "metrics are on the validation split: data.val_split auto means ROOT/val "
            "when present, else ROOT/test; a number is that share of train",
        },
        "export": {
            "segtune": version,
            "torch": torch.__version__,
            "verification": verification,
        },
    }


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def readme(card: dict[str, Any]) -> str:
    """The card in words, for whoever opens the folder."""
    src, files, inp = card["source"], card["files"], card["input"]
    metrics, cost, cfg = card["metrics"], card["cost"], card["model"]["config"]
    lines = [
        f"# {card['model']['label']} (segtune export)",
        "",
        f"Exported {card['created']} from MLflow run `{src['run_id']}` ({src['run_name']}) of "
        f"experiment `{src['experiment']}`"
        + (f", sweep `{src['sweep']}` (run `{src['sweep_run_id']}`)" if src["sweep"] else "")
        + f"; tracking URI `{src['tracking_uri']}`.",
        "",
        "## Files",
        "",
        "| file | what |",
        "| --- | --- |",
    ]
    if files.get("torchscript"):
        lines.append(
            f"| `{files['torchscript']}` | TorchScript: `torch.jit.load(path)`, no segtune code "
            "needed; any batch, height and width |"
        )
    if files.get("onnx"):
        onnx = card["export"]["verification"].get("onnx", {})
        lines.append(
            f"| `{files['onnx']}` | ONNX (opset {onnx.get('opset')}, {onnx.get('exporter')} "
            "exporter), dynamic batch, height and width |"
        )
    lines += [
        f"| `{files['checkpoint']}` | the trial's checkpoint as MLflow holds it: "
        "`torch.load(path, weights_only=True)` |",
        f"| `{CARD_FILE}` | all of this page, machine-readable |",
        f"| `{CHECKSUMS_FILE}` | `sha256sum -c {CHECKSUMS_FILE}`; segtune.predict checks it |",
        "",
        "## Input and output",
        "",
        f"- `{inp['name']}`: float32 N x 3 x H x W, RGB, normalised as (x - 255 mean) / "
        f"(255 std) with mean {inp['mean']} and std {inp['std']} (ImageNet).",
        f"- The trial evaluated whole images: {inp['rule']} (eval resize `{inp['resize']}`). "
        "Do the same: any size runs, but other preprocessing changes the results.",
        f"- `logits`: float32 N x {card['output']['shape'][1]} x H x W; argmax over dim 1 gives "
        f"class ids. Ignore index {card['ignore_index']} (never predicted).",
        "",
        "## Classes",
        "",
        "| id | class | colour (RGB) |",
        "| --- | --- | --- |",
        *(f"| {c['id']} | {c['name']} | {tuple(c['color'])} |" for c in card["classes"]),
        "",
        "## Quality (validation split, best epoch)",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    quality = ("best_val_miou", "best_epoch", "val_acc", "val_class_acc")
    lines += [f"| {k} | {_fmt(metrics[k])} |" for k in quality if k in metrics]
    ious = {c["name"]: metrics.get(f"val_iou_{c['name']}") for c in card["classes"]}
    lines += [f"| IoU {name} | {_fmt(v)} |" for name, v in ious.items() if v is not None]
    lines += ["", "## Cost", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in cost.items() if k != "conditions"]
    conditions = ", ".join(f"{k}={v}" for k, v in cost["conditions"].items())
    lines += [
        "",
        f"Measured under: {conditions or 'not recorded'}.",
        "",
        "## Training",
        "",
        f"{cfg['arch']} / {cfg['backbone']}"
        + (f", ASPP {cfg['aspp']}" if cfg["arch"] != "unet" else "")
        + f"; augment {cfg['augment']}, lr {cfg['lr']}, {cfg['epochs']} epochs of batch "
        f"{cfg['batch_size']} at {cfg['image_size']} px, loss {cfg['loss']}, optimizer "
        f"{cfg['optimizer']}, seed {cfg['seed']}. Data: `{card['data'].get('root', 'unknown')}` "
        f"(validation: {card['data'].get('val_split', 'auto')}).",
        "",
        "## Use",
        "",
        "```",
        "python -m segtune.predict THIS_FOLDER images/ --out masks/ --overlay",
        "```",
        "",
        "```python",
        "import torch",
        f"model = torch.jit.load('{TORCHSCRIPT_FILE}').eval()",
        "with torch.inference_mode():",
        "    ids = model(x).argmax(1)  # x: 1 x 3 x H x W, normalised and padded as above",
        "```",
        "",
    ]
    return "\n".join(lines)


def _check_out(out: Path) -> None:
    """An existing --out is replaced only when it is an export folder (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out}: a file; choose a folder")
    ours = (out / CARD_FILE).exists() or (out / CHECKSUMS_FILE).exists()
    if any(out.iterdir()) and not ours:
        raise ExportError(
            f"--out {out}: exists and is not an export folder; choose another --out or empty it"
        )


def _publish(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


# --- registry --------------------------------------------------------------------------------


def register(
    tracking_uri: str,
    model_name: str,
    module: torch.jit.ScriptModule,
    card: dict[str, Any],
    card_path: Path,
) -> int:
    """Log the TorchScript model in an export run under the trial's run and register it.

    The version is tagged with the trial's metrics and cost, and its source run, so the
    registry alone tells which trial it is and what it scored.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    client = MlflowClient(tracking_uri)
    src = card["source"]
    num_classes = card["output"]["shape"][1]
    # unnamed tensors: the PyTorch flavour hands a named one over as a dict, which it rejects
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1))]),
    )
    run = client.create_run(
        src["experiment_id"],
        run_name=f"export-{card['model']['label']}",
        tags={
            ROLE_TAG: ROLE_EXPORT,
            MLFLOW_PARENT_RUN_ID: src["run_id"],
            SOURCE_RUN_TAG: src["run_id"],
            LABEL_TAG: card["model"]["label"],
        },
    )
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    # it warns that pickle is unsafe, but for a ScriptModule it writes torch.jit.save's archive
    flavour_log = logging.getLogger("mlflow.pytorch")
    level = flavour_log.level
    flavour_log.setLevel(logging.ERROR)
    try:
        with mlflow.start_run(run_id=run.info.run_id), warnings.catch_warnings():
            # MLflow reloads the model to check the input example: torch.load dispatches the
            # TorchScript archive to torch.jit.load, and both say so
            warnings.filterwarnings("ignore", message=JIT_DEPRECATION)
            warnings.filterwarnings("ignore", message=r".*TorchScript archive")
            info = mlflow.pytorch.log_model(
                module,
                name="model",
                signature=signature,
                input_example=random_input((64, 64)).numpy(),
                registered_model_name=model_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                serialization_format="pickle",  # for a ScriptModule: torch.jit.save, no pickle
                metadata={"segtune_source_run_id": src["run_id"]},
            )
            mlflow.log_artifact(str(card_path))
            mlflow.log_metrics({**card["metrics"], **finite_metrics(card["cost"])})
    except MlflowException as exc:
        raise ExportError(f"--register {model_name}: {exc.message.splitlines()[0]}") from None
    finally:
        mlflow.set_tracking_uri(previous)
        flavour_log.setLevel(level)
    version = int(info.registered_model_version)
    headline = {
        k: v
        for k, v in {**card["metrics"], **finite_metrics(card["cost"])}.items()
        if k in FINAL_METRICS or k in ("val_acc", "val_class_acc") or k.startswith("val_iou_")
    }
    tags = {
        **{k: _fmt(v, 6) for k, v in headline.items()},
        "source_run_id": src["run_id"],
        "experiment": src["experiment"],
        "label": card["model"]["label"],
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    client.update_model_version(
        model_name,
        str(version),
        description=f"{card['model']['label']} from trial run {src['run_id']} of "
        f"{src['experiment']}; best_val_miou {_fmt(card['metrics'].get('best_val_miou'))}",
    )
    return version


# --- the command line ------------------------------------------------------------------------


@dataclass
class ExportResult:
    out: Path
    card: dict[str, Any]
    registered_version: int | None = None


def export(
    *,
    experiment: str | None,
    out: Path | None = None,
    metric: str = OBJECTIVE,
    mode: str = "max",
    budget: str | None = None,
    run_id: str | None = None,
    formats: Sequence[str] = FORMATS,
    register_as: str | None = None,
    tracking_uri: str | None = None,
    all_sweeps: bool = False,
) -> ExportResult:
    """Choose the trial, write the export folder, and optionally register the model."""
    if experiment is None and run_id is None:
        raise ConfigError("pass --experiment NAME (its best trial) or --run-id ID (one trial)")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"--format {','.join(formats)}: choose from {', '.join(FORMATS)}")
    if "onnx" in formats:
        _onnx_modules()  # fail before any download
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    if run_id:
        source = trial_by_id(client, run_id, experiment)
    else:
        assert experiment is not None
        source = best_trial(client, experiment, uri, metric, mode, budget, all_sweeps)
    out = out or Path("exports") / source.experiment
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "download").mkdir(parents=True)
    try:
        card, module = _write(client, uri, source, staging, formats)
        shutil.rmtree(staging / "download")
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported run %s to %s", source.run.info.run_id, out)
    version = register(uri, register_as, module, card, out / CARD_FILE) if register_as else None
    return ExportResult(out, card, version)


def _write(
    client: MlflowClient, uri: str, source: Source, folder: Path, formats: Sequence[str]
) -> tuple[dict[str, Any], torch.jit.ScriptModule]:
    """best.pt, the model files, card, README and checksums into `folder`."""
    run_id = source.run.info.run_id
    downloaded = download_checkpoint(client, run_id, folder / "download")
    ckpt = load_checkpoint(downloaded)
    model, cfg = checkpoint_model(ckpt)
    shutil.copyfile(downloaded, folder / CHECKPOINT_FILE)
    log.info("exporting %s (run %s)", cfg.label(), run_id)

    files: dict[str, str | None] = {"torchscript": None, "onnx": None}
    verification: dict[str, Any] = {
        "inputs": [[VERIFY_BATCH, 3, h, w] for h, w in VERIFY_HW],
        "traced_at": list(TRACE_HW),
        "tolerance": TOLERANCE,
    }
    reference = Reference.of(model)
    module, diff = export_torchscript(model, folder / TORCHSCRIPT_FILE, reference)
    if "torchscript" in formats:
        files["torchscript"] = TORCHSCRIPT_FILE
        verification["torchscript_max_abs_diff"] = diff
    else:
        (folder / TORCHSCRIPT_FILE).unlink()  # traced for --register and the checks only
    if "onnx" in formats:
        onnx_info, diff = export_onnx(model, folder / ONNX_FILE, reference)
        files["onnx"] = ONNX_FILE
        verification["onnx"] = onnx_info
        verification["onnx_max_abs_diff"] = diff
    files["checkpoint"] = CHECKPOINT_FILE
    files["readme"] = README_FILE

    card = model_card(
        source,
        ckpt,
        cfg,
        _sweep_info(client, source.run, folder / "download"),
        uri,
        files,
        verification,
    )
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    (folder / README_FILE).write_text(readme(card))
    write_checksums(folder, [name for name in files.values() if name] + [CARD_FILE])
    return card, module


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segtune.export",
        description="Export the best trial of a sweep (or one trial run) from MLflow as "
        "TorchScript, ONNX, checkpoint, model card and checksums.",
    )
    p.add_argument("--experiment", help="MLflow experiment (the sweep's name)")
    p.add_argument("--metric", default=OBJECTIVE, help=f"what 'best' means (default {OBJECTIVE})")
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument(
        "--budget",
        help="only trials within it, e.g. 'infer_ms_cpu<=50,size_mb<20' (as in the dashboards)",
    )
    p.add_argument("--run-id", help="export this trial run instead of choosing the best")
    p.add_argument(
        "--all-sweeps",
        action="store_true",
        help="choose among every sweep of the experiment (default: the newest sweep)",
    )
    p.add_argument("--out", type=Path, help="export folder (default: exports/EXPERIMENT)")
    p.add_argument(
        "--format",
        default=",".join(FORMATS),
        help="comma-separated: torchscript, onnx (default both)",
    )
    p.add_argument("--register", metavar="MODEL_NAME", help="register in the MLflow Model Registry")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    if not args.verbose:  # the ONNX exporter's optimiser logs every pass at INFO
        for name in ("onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.WARNING)
    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    result = export(
        experiment=args.experiment,
        out=args.out,
        metric=args.metric,
        mode=args.mode,
        budget=args.budget,
        run_id=args.run_id,
        formats=formats,
        register_as=args.register,
        tracking_uri=args.tracking_uri,
        all_sweeps=args.all_sweeps,
    )
    card = result.card
    check = card["export"]["verification"]
    src = card["source"]
    metric = card["metrics"].get(args.metric, card["cost"].get(args.metric))
    print(
        f"exported {card['model']['label']} (run {src['run_id']}, {args.metric} "
        f"{_fmt(metric)}) to {result.out}"
    )
    sizes = ", ".join(f"{h}x{w}" for h, w in VERIFY_HW)
    if "torchscript_max_abs_diff" in check:
        print(
            f"  {TORCHSCRIPT_FILE:<16}TorchScript, max |logit diff| vs checkpoint "
            f"{check['torchscript_max_abs_diff']:.2g} on {sizes}"
        )
    if "onnx_max_abs_diff" in check:
        onnx = check["onnx"]
        print(
            f"  {ONNX_FILE:<16}ONNX opset {onnx['opset']} ({onnx['exporter']} exporter), "
            f"max |logit diff| {check['onnx_max_abs_diff']:.2g}"
        )
    print(f"  {CHECKPOINT_FILE}, {CARD_FILE}, {README_FILE}, {CHECKSUMS_FILE}")
    if result.registered_version is not None:
        print(f"registered as models:/{args.register}/{result.registered_version}")
    print(f"predict: python -m segtune.predict {result.out} IMAGES... --out masks/ --overlay")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
