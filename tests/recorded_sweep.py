"""A tiny sweep written into real MLflow with the contract helpers of segtune.tracking: the
fixture data of the dashboards and export tests.

An older sweep with two trials, and the newest sweep with seven: UNet with and without
augmentation (two seeds each, named without and with the seed; the best trial, with eval
artifacts, is one of them), DeepLab with
ResNet18 (no CPU latency logged) and MobileNet, and one FAILED trial. No GPU latency anywhere, as on a CPU
machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from PIL import Image

from segtune.classes import CLASS_NAMES, colorize
from segtune.config.names import CONFUSION_ARTIFACT, EXAMPLES_DIR, PER_IMAGE_ARTIFACT
from segtune.config.trial import TrialConfig
from segtune.tracking.runs import TrialRun, start_sweep_run

EPOCHS = 6
IMAGE_IDS = [f"img{i}" for i in range(6)]


@dataclass
class Spec:
    keys: dict[str, object]
    miou: float  # final best_val_miou
    finals: dict[str, float]
    error: str | None = None
    artifacts: bool = False
    seed_in_name: bool = False  # run names as segtune.run writes them for repeats: `...-s1`

    @property
    def config(self) -> TrialConfig:
        return TrialConfig.model_validate(self.keys)


def _unet(augment: str, seed: int, miou: float, **kwargs: bool) -> Spec:
    return Spec(
        {"arch": "unet", "backbone": "none", "augment": augment, "seed": seed, "lr": 1e-3},
        miou,
        {
            "train_time_min": 4.1 + 0.1 * seed,
            "infer_ms_cpu": 310.0 + seed,
            "size_mb": 118.0,
            "data_wait_frac_mean": 0.05,
        },
        **kwargs,
    )


def newest_specs() -> list[Spec]:
    deeplab = {"arch": "deeplabv3", "aspp": True, "augment": "basic", "seed": 0, "lr": 1e-3}
    return [
        _unet("none", 0, 0.20),
        _unet("none", 1, 0.21),
        _unet("basic", 0, 0.25, seed_in_name=True),
        _unet("basic", 1, 0.29, seed_in_name=True, artifacts=True),
        Spec(
            {**deeplab, "backbone": "resnet18"},
            0.24,
            {"train_time_min": 2.5, "size_mb": 63.0},  # no infer_ms_cpu: a missing metric
        ),
        Spec(
            {**deeplab, "backbone": "mobilenet_v3_small"},
            0.27,
            # its loader held it back (segtune.config.names.input_bound)
            {
                "train_time_min": 1.2,
                "infer_ms_cpu": 12.0,
                "size_mb": 4.4,
                "data_wait_frac_mean": 0.45,
            },
        ),
        Spec(
            {**deeplab, "backbone": "vgg11_bn"},
            0.05,
            {},
            error="TrainingDiverged: loss became NaN at epoch 2; lower lr",
        ),
    ]


def older_specs() -> list[Spec]:
    return [_unet("none", 0, 0.15), _unet("strong", 0, 0.18)]


def _curves(spec: Spec, rng: np.random.Generator, epochs: int) -> list[dict[str, float]]:
    rows = []
    for epoch in range(epochs):
        progress = 1 - np.exp(-(epoch + 1) / 2)
        miou = spec.miou * progress + rng.normal(0, 0.01)
        row = {
            "train_loss": 1.8 * np.exp(-epoch / 3) + 0.3 + rng.normal(0, 0.05),
            "val_loss": 1.9 * np.exp(-epoch / 4) + 0.5 + rng.normal(0, 0.12),
            "val_miou": miou,
            "val_acc": 0.5 + miou,
            "lr": 1e-3 * (1 - epoch / epochs),
            "epoch_time_s": 20.0,
        }
        row.update({f"val_iou_{c}": miou * (0.5 + i / 8) for i, c in enumerate(CLASS_NAMES)})
        rows.append(row)
    return rows


def _composite(rng: np.random.Generator, path: Path) -> None:
    """image | prediction | ground truth, as the evaluation writes them."""
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    truth = rng.integers(0, len(CLASS_NAMES), (48, 64)).astype(np.uint8)
    pred = np.where(rng.random((48, 64)) < 0.7, truth, 0).astype(np.uint8)
    Image.fromarray(np.concatenate([image, colorize(pred), colorize(truth)], axis=1)).save(path)


def write_eval(tmp: Path, rng: np.random.Generator) -> Path:
    """eval/per_image.csv, eval/confusion.csv and eval/examples/*.png of one trial."""
    root = tmp / "eval"
    (root / "examples").mkdir(parents=True)
    table = pd.DataFrame({"id": IMAGE_IDS})
    for name in CLASS_NAMES:
        values = rng.uniform(0, 1, len(IMAGE_IDS))
        if name == "vehicle":
            values[:] = np.nan  # in no image: a class without examples
        elif name == "pool":
            values[1:] = np.nan  # in one image only: best and worst are the same
        table[f"iou_{name}"] = values
    table["miou"] = table[[f"iou_{c}" for c in CLASS_NAMES]].mean(axis=1)
    table.to_csv(tmp / PER_IMAGE_ARTIFACT, index=False)
    counts = rng.integers(0, 50, (len(CLASS_NAMES), len(CLASS_NAMES))) + np.eye(
        len(CLASS_NAMES), dtype=int
    ) * rng.integers(200, 900, len(CLASS_NAMES))
    pd.DataFrame(counts, index=CLASS_NAMES, columns=CLASS_NAMES).to_csv(tmp / CONFUSION_ARTIFACT)
    ranked = table.sort_values("miou", ascending=False)["id"].tolist()
    for rank, image_id in enumerate(ranked[:2], 1):
        _composite(rng, tmp / EXAMPLES_DIR / f"best_{rank}_{image_id}.png")
    for rank, image_id in enumerate(reversed(ranked[-2:]), 1):
        _composite(rng, tmp / EXAMPLES_DIR / f"worst_{rank}_{image_id}.png")
    for name in ("building", "water", "pool"):  # composites for some classes only
        values = table[f"iou_{name}"]
        for kind, idx in (("best", values.idxmax()), ("worst", values.idxmin())):
            image_id = table.at[idx, "id"]
            _composite(rng, tmp / EXAMPLES_DIR / f"class_{name}_{kind}_{image_id}.png")
    return root


FLOOR = 0.2  # the colour-only floor the recorded sweeps carry


def log_sweep(
    client: MlflowClient, experiment: str, name: str, specs: list[Spec], tmp: Path, seed: int = 0
) -> tuple[str, list[str]]:
    """A parent run and one trial run per spec; returns the parent id and the trial run ids."""
    rng = np.random.default_rng(seed)
    parent = start_sweep_run(client, experiment, name, f"name: {name}\n", "a test sweep")
    client.log_metric(parent, "floor_miou", FLOOR)  # as segtune.run keeps it
    run_ids = []
    for i, spec in enumerate(specs):
        config = spec.config
        trial = TrialRun.open(
            client,
            experiment=experiment,
            parent_run_id=parent,
            label=config.label(seed=spec.seed_in_name),
            config_label=config.label(),
            trial_id=f"t{i:05d}",
            params=config.model_dump(),
        )
        epochs = 2 if spec.error else EPOCHS
        for epoch, metrics in enumerate(_curves(spec, rng, epochs)):
            trial.log_epoch(epoch, metrics)
        if spec.error:
            trial.finish(spec.error)
        else:
            trial.log_final(
                {
                    "best_val_miou": spec.miou,
                    "best_epoch": EPOCHS - 1,
                    "params_m": spec.finals.get("size_mb", 0) / 4,
                    "gflops": 10.0,
                    "train_img_s": 30.0,
                    **spec.finals,
                }
            )
            if spec.artifacts:
                trial.log_artifact(write_eval(tmp / f"trial{i}", rng), "eval")
            trial.finish()
        run_ids.append(trial.run_id)
    return parent, run_ids
