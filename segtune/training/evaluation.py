"""Evaluation of a trial's best weights: per-image rows, the confusion matrix, and the pictures
of the study's Task 4 (best and worst images, and each class's best and worst image).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from segtune.classes import CLASS_NAMES, colorize
from segtune.data.dataset import SegmentationDataset
from segtune.data.loader import make_loader
from segtune.models.device import autocast
from segtune.training.engine import evaluate
from segtune.training.metrics import ConfusionMatrix, band_target, per_image_rows

log = logging.getLogger(__name__)

GAP = 4  # white pixels between the panels of a composite


def composite(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """image | prediction | ground truth, side by side (the study's Pictures 9 and 10)."""
    height, width = truth.shape
    gap = np.full((height, GAP, 3), 255, np.uint8)
    return np.concatenate([image, gap, colorize(prediction), gap, colorize(truth)], axis=1)


def pick_examples(rows: pd.DataFrame, count: int = 3) -> dict[str, str]:
    """File stem -> image id: the best and worst images overall, and per class by its IoU."""
    picks: dict[str, str] = {}
    ranked = rows.dropna(subset=["miou"]).sort_values("miou", ascending=False)
    for rank, sample_id in enumerate(ranked["id"].head(count), 1):
        picks[f"best_{rank}_{sample_id}"] = sample_id
    for rank, sample_id in enumerate(ranked["id"].iloc[::-1].head(count), 1):
        picks[f"worst_{rank}_{sample_id}"] = sample_id
    for name in CLASS_NAMES:
        scored = rows.dropna(subset=[f"iou_{name}"]).sort_values(f"iou_{name}")
        if scored.empty:
            continue
        best, worst = scored["id"].iloc[-1], scored["id"].iloc[0]
        picks[f"class_{name}_best_{best}"] = best
        if worst != best:
            picks[f"class_{name}_worst_{worst}"] = worst
    return picks


@torch.inference_mode()
def evaluate_best(
    model: nn.Module,
    dataset: SegmentationDataset,
    out_dir: Path,
    device: torch.device,
    dtype: torch.dtype | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Write `per_image.csv`, `confusion.csv`, `boundary_confusion.csv` (the pixels within
    BOUNDARY_PX of a class boundary) and `examples/*.png` under `out_dir`; returns the split's
    scores with `boundary_miou`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    band = ConfusionMatrix(device=device)

    def collect(batch: dict[str, Any], predictions: torch.Tensor) -> None:
        rows.extend(per_image_rows(predictions, batch["mask"], batch["id"]))
        band.update(predictions, band_target(batch["mask"].to(device)))

    matrix = ConfusionMatrix(device=device)
    loader = make_loader(dataset, batch_size, shuffle=False)
    scores = evaluate(model, loader, None, device, dtype, on_batch=collect, matrix=matrix)
    scores["boundary_miou"] = band.compute()["miou"]
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "per_image.csv", index=False)
    matrix.to_dataframe().to_csv(out_dir / "confusion.csv")
    band.to_dataframe().to_csv(out_dir / "boundary_confusion.csv")

    examples = out_dir / "examples"
    examples.mkdir(exist_ok=True)
    index = {sample.id: i for i, sample in enumerate(dataset.samples)}
    stems: dict[str, list[str]] = {}  # an image picked for several reasons is predicted once
    for stem, sample_id in pick_examples(table).items():
        stems.setdefault(sample_id, []).append(stem)
    for sample_id, names in stems.items():
        i = index[sample_id]
        item = dataset[i]
        image, truth = dataset.load(i)
        with autocast(device, dtype):
            logits = model(item["image"][None].to(device))
        height, width = truth.shape
        prediction = logits.float().argmax(1)[0, :height, :width].cpu().numpy().astype(np.uint8)
        if prediction.shape != truth.shape:  # eval resize: compare at the network's resolution
            prediction = np.asarray(
                Image.fromarray(prediction).resize((width, height), Image.NEAREST)
            )
        first, *others = (examples / f"{stem}.png" for stem in names)
        Image.fromarray(composite(image, prediction, truth)).save(first)
        for path in others:
            shutil.copyfile(first, path)
    return scores
