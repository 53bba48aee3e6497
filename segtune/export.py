"""`python -m segtune.export --experiment NAME`: the best trial of a sweep as deployable files.

The trial is chosen from MLflow as the dashboards see it (`segtune.tracking.select`): the best finished
trial by `--metric` (ties go to the smaller model, `size_mb`), within optional `--constraints`,
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
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from segtune.cli import command_parser, run_cli, setup_logging
from segtune.config.names import CHECKPOINT_ARTIFACT, OBJECTIVE, format_metric
from segtune.deploy.bundle import (
    CARD_FILE,
    CHECKPOINT_FILE,
    CHECKSUMS_FILE,
    ONNX_FILE,
    README_FILE,
    TORCHSCRIPT_FILE,
    ExportError,
    check_out,
    publish,
    write_checksums,
)
from segtune.deploy.card import model_card, readme, sweep_info
from segtune.deploy.convert import (
    FORMATS,
    TOLERANCE,
    TRACE_HW,
    VERIFY_BATCH,
    VERIFY_HW,
    Reference,
    checkpoint_model,
    export_onnx,
    export_torchscript,
    onnx_modules,
)
from segtune.deploy.registry import register
from segtune.errors import ConfigError
from segtune.models.checkpoint import load_checkpoint
from segtune.tracking.address import check_tracking_uri, resolve_tracking_uri
from segtune.tracking.select import Source, best_trial, trial_by_id

log = logging.getLogger(__name__)


def download_checkpoint(client: MlflowClient, run_id: str, dst: Path) -> Path:
    """`checkpoints/best.pt` through the MLflow client (works through a server's proxy)."""
    try:
        return Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dst)))
    except (MlflowException, OSError) as exc:
        raise ExportError(f"run {run_id}: cannot download {CHECKPOINT_ARTIFACT} ({exc})") from None


HOLDER_PID = "segtune-export.pid"  # in the folder an export is written in: whose it is


def holder_prefix(out: Path) -> str:
    return f".{out.name}.segtune-export-"


def remove_stale_holders(out: Path) -> None:
    """Remove what a killed export to `out` left beside it: folders by our prefix whose pid
    file names a process that is gone (a folder without one is not proven ours: kept)."""
    for holder in out.parent.iterdir():
        if not holder.name.startswith(holder_prefix(out)):
            continue
        try:
            pid = int((holder / HOLDER_PID).read_text())
        except (OSError, ValueError):
            continue
        if not psutil.pid_exists(pid):
            log.info("removing %s, left by an interrupted export", holder)
            shutil.rmtree(holder, ignore_errors=True)


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
    constraints: str | None = None,
    run_id: str | None = None,
    formats: Sequence[str] = FORMATS,
    register_as: str | None = None,
    tracking_uri: str | None = None,
    all_sweeps: bool = False,
    force: bool = False,
) -> ExportResult:
    """Choose the trial, write the export folder, and optionally register the model."""
    if experiment is None and run_id is None:
        raise ConfigError("pass --experiment NAME (its best trial) or --run-id ID (one trial)")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"--format {','.join(formats)}: choose from {', '.join(FORMATS)}")
    if "onnx" in formats:
        onnx_modules()  # fail before any download
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)  # one line in seconds, not MLflow's exception or minutes of retries
    client = MlflowClient(uri)
    if run_id:
        source = trial_by_id(client, run_id, experiment)
    else:
        assert experiment is not None
        source = best_trial(client, experiment, uri, metric, mode, constraints, all_sweeps)
    out = check_out(out or Path("exports") / source.experiment, force).path
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_holders(out)
        # a name created exclusively: never a user's file, and ours to remove
        holder = Path(tempfile.mkdtemp(dir=out.parent, prefix=holder_prefix(out)))
        (holder / HOLDER_PID).write_text(str(os.getpid()))
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write beside it ({exc})") from None
    staging = holder / "new"
    try:
        try:
            (staging / "download").mkdir(parents=True)
            card, module = _write(client, uri, source, staging, formats)
            shutil.rmtree(staging / "download")
        except OSError as exc:  # a full disk, a file size limit
            raise ExportError(
                f"--out {out}: writing the export failed ({exc}); --out is unchanged"
            ) from None
        try:
            publish(staging, out, force, holder / "old")
        except OSError as exc:
            raise ExportError(f"--out {out}: cannot put the export in place ({exc})") from None
    finally:
        shutil.rmtree(holder, ignore_errors=True)
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
        sweep_info(client, source.run, folder / "download"),
        uri,
        files,
        verification,
    )
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    (folder / README_FILE).write_text(readme(card))
    write_checksums(folder, [name for name in files.values() if name] + [CARD_FILE])
    return card, module


def _parser() -> argparse.ArgumentParser:
    p = command_parser(
        "python -m segtune.export",
        "Export the best trial of a sweep (or one trial run) from MLflow as "
        "TorchScript, ONNX, checkpoint, model card and checksums.",
        tracking=True,
    )
    p.add_argument("--experiment", help="MLflow experiment (the sweep's name)")
    p.add_argument("--metric", default=OBJECTIVE, help=f"what 'best' means (default {OBJECTIVE})")
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument(
        "--constraints",
        "--budget",  # its former name
        dest="constraints",
        help="only trials within them, e.g. 'infer_ms_cpu<=50,size_mb<20' (as in the report)",
    )
    p.add_argument("--run-id", help="export this trial run instead of choosing the best")
    p.add_argument(
        "--all-sweeps",
        action="store_true",
        help="choose among every sweep of the experiment (default: the newest sweep)",
    )
    p.add_argument("--out", type=Path, help="export folder (default: exports/EXPERIMENT)")
    p.add_argument(
        "--force",
        action="store_true",
        help="also write into a folder that holds other files: the export's files go in beside "
        "them (an earlier export's files there are replaced); no other file is ever deleted or "
        "overwritten, and a file of an export's name that segtune did not write is refused",
    )
    p.add_argument(
        "--format",
        default=",".join(FORMATS),
        help="comma-separated: torchscript, onnx (default both)",
    )
    p.add_argument("--register", metavar="MODEL_NAME", help="register in the MLflow Model Registry")
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
        constraints=args.constraints,
        run_id=args.run_id,
        formats=formats,
        register_as=args.register,
        tracking_uri=args.tracking_uri,
        all_sweeps=args.all_sweeps,
        force=args.force,
    )
    card = result.card
    check = card["export"]["verification"]
    src = card["source"]
    metric = card["metrics"].get(args.metric, card["cost"].get(args.metric))
    print(
        f"exported {card['model']['label']} (run {src['run_id']}, {args.metric} "
        f"{format_metric(metric)}) to {result.out}"
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
