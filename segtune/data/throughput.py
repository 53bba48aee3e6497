"""Images per second of one loader worker, as a trial's training loader makes them: decoding
(or the cache), the augmentation preset, the crop, collation into batches.

A trial that trains at R images/s needs about R / rate loader workers, each a cpu of
`resources_per_trial`, or its step waits for data (`data_wait_frac`, segtune.training.engine).
`python -m segtune.bench loader SWEEP.yaml` prints the rates for a sweep's settings.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
from torch.utils.data import DataLoader

from segtune.config.trial import DataConfig, TrialConfig
from segtune.data.loader import make_loader, set_epoch
from segtune.data.pipeline import build_data
from segtune.data.transforms import train_transform


@dataclass(frozen=True)
class LoaderRate:
    """One setting's images/s per worker: the median of the timed runs, and every run's."""

    augment: str
    image_size: int
    cache: bool
    img_s: float
    runs: tuple[float, ...]

    @property
    def spread(self) -> float:
        """(max - min) / median of the runs: how far one run's figure may be trusted."""
        return (max(self.runs) - min(self.runs)) / self.img_s if self.img_s > 0 else math.nan


def loader_rates(
    data: DataConfig,
    trials: Sequence[TrialConfig],
    images: int = 256,
    repeats: int = 3,
    warmup: int = 1,
) -> list[LoaderRate]:
    """The rate of one worker for each (augment, image_size) the `trials` hold, in their order.

    The training set is built once, as a trial builds it (`build_data`: the cache as `data`
    says); each setting swaps in its transform and reads at least `images` images per run
    through a one-worker DataLoader of the trial's batch size, after `warmup` untimed runs
    (the worker's start, the cache's first touch).
    """
    dataset = build_data(data, trials[0], progress=False).train
    epochs = itertools.count()  # each pass its own order and augmentations
    rates: list[LoaderRate] = []
    for trial in trials:
        if any((r.augment, r.image_size) == (trial.augment, trial.image_size) for r in rates):
            continue
        dataset.transform = train_transform(trial.augment, trial.image_size, seed=trial.seed)
        loader = make_loader(
            dataset, trial.batch_size, shuffle=True, seed=trial.seed, num_workers=1
        )
        for _ in range(warmup):
            _rate(loader, images, epochs)
        runs = tuple(_rate(loader, images, epochs) for _ in range(repeats))
        del loader  # its worker process ends
        median = statistics.median(runs)
        rates.append(LoaderRate(trial.augment, trial.image_size, data.cache, median, runs))
    return rates


def _rate(loader: DataLoader[Any], images: int, epochs: Iterator[int]) -> float:
    """Images/s of whole passes over the loader until at least `images` came out."""
    seen, started = 0, time.perf_counter()
    while seen < images:
        set_epoch(loader, next(epochs))
        seen += sum(len(batch["id"]) for batch in loader)
    return seen / (time.perf_counter() - started)


def worker_threads() -> str:
    """The threads a loader worker computes with: torch sets 1 in each worker, OpenCV keeps its
    own pool (albumentations' resizes and warps use it)."""
    return f"torch 1 thread a worker (DataLoader's setting), OpenCV {cv2.getNumThreads()} threads"
