"""The model card (`model_card.json`) and its README: what a user of an export folder needs to
know, machine-readable and in words."""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from segtune.config.names import (
    COST_KEYS,
    COST_TAG_PREFIX,
    FINAL_METRICS,
    QUALITY_METRICS,
    SWEEP_ARTIFACT,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    format_metric,
)
from segtune.config.trial import TrialConfig
from segtune.deploy.bundle import CARD_FILE, CARD_FORMAT, CHECKSUMS_FILE, TORCHSCRIPT_FILE
from segtune.tracking.address import public_uri
from segtune.tracking.runs import finite_metrics
from segtune.tracking.select import Source

log = logging.getLogger(__name__)


def sweep_info(client: MlflowClient, run: Run, dst: Path) -> dict[str, Any]:
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
                k.removeprefix(COST_TAG_PREFIX): v
                for k, v in sorted(run.data.tags.items())
                if k.startswith(COST_TAG_PREFIX)
            },
        },
        "source": {
            "tracking_uri": public_uri(tracking_uri),
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
    quality = (*QUALITY_METRICS, "val_acc", "val_class_acc")
    lines += [f"| {k} | {format_metric(metrics[k])} |" for k in quality if k in metrics]
    ious = {c["name"]: metrics.get(f"val_iou_{c['name']}") for c in card["classes"]}
    lines += [f"| IoU {name} | {format_metric(v)} |" for name, v in ious.items() if v is not None]
    lines += ["", "## Cost", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {k} | {format_metric(v)} |" for k, v in cost.items() if k != "conditions"]
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
