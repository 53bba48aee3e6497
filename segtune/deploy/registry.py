"""The MLflow Model Registry side of an export: the TorchScript model logged in an export run
under the trial's run, registered, and tagged with what the trial scored."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from segtune.config.names import (
    FINAL_METRICS,
    LABEL_TAG,
    OBJECTIVE,
    ROLE_EXPORT,
    ROLE_TAG,
    SOURCE_RUN_TAG,
    format_metric,
)
from segtune.deploy.bundle import JIT_DEPRECATION, ExportError
from segtune.models import example_input
from segtune.tracking.runs import finite_metrics

log = logging.getLogger(__name__)


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
                input_example=example_input((64, 64)).numpy(),
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
        **{k: format_metric(v, "{:.6g}") for k, v in headline.items()},
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
        f"{src['experiment']}; {OBJECTIVE} {format_metric(card['metrics'].get(OBJECTIVE))}",
    )
    return version
