"""DataLoader factory whose batches depend only on (seed, epoch), whatever the worker count.

The sampler yields `(index, augmentation seed)` pairs: the order of an epoch is drawn from
`(seed, epoch)` and each sample's augmentation from `(seed, epoch, index)`. So a run resumed
at epoch 3 sees exactly the batches an uninterrupted run would, and forked workers never
share albumentations' internal random state (which it keeps apart from numpy and torch).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields `(index, augmentation seed)`; call `set_epoch` before each epoch."""

    def __init__(self, length: int, *, shuffle: bool, seed: int) -> None:
        self.length, self.shuffle, self.seed, self.epoch = length, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        for index in order:
            yield index, _mix(self.seed, self.epoch, index)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each worker for any randomness outside the transform."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader[Any]:
    """A DataLoader with an `EpochSampler`; pinned memory when CUDA is present."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), shuffle=shuffle, seed=seed),  # type: ignore[arg-type]
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def set_epoch(loader: DataLoader[Any], epoch: int) -> None:
    """Make the loader's next pass the one of `epoch` (order and augmentations)."""
    sampler = loader.sampler
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch)
