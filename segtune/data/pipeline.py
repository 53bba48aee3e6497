"""From a data and a trial configuration to ready DataLoaders: the data stage of one trial."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from torch.utils.data import DataLoader

from segtune.config.trial import DataConfig, SyntheticSpec, TrialConfig, parse_hw
from segtune.data.cache import DecodedSplit, cache_name, decoded_bytes, ensure_decoded, room_problem
from segtune.data.dataset import (
    Sample,
    SegmentationDataset,
    available_splits,
    fingerprint,
    holdout,
    image_sizes,
    scan_split,
)
from segtune.data.loader import make_loader
from segtune.data.transforms import eval_transform, train_transform
from segtune.errors import DatasetError
from segtune.paths import folder_written_whole

log = logging.getLogger(__name__)

SYNTHETIC_MARKER = ".segtune-synthetic.json"  # written last: the set beside it is complete


@dataclass
class DataBundle:
    """The datasets and loaders of one trial, and the training set's class pixel counts."""

    train: SegmentationDataset
    val: SegmentationDataset
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    val_split: str
    class_pixels: np.ndarray


def ensure_dataset(data: DataConfig, progress: bool = True) -> Path:
    """The dataset root, generating the synthetic set there first when one is asked for.

    The set is written into a folder beside the root and renamed into place, under a file
    lock, with a marker that records its spec: a concurrent caller (another trial, another
    process on the node) waits for it and never reads half a set.
    """
    root = Path(data.root)
    spec = data.synthetic
    if spec is None:
        return root
    marker = root / SYNTHETIC_MARKER
    wanted = spec.model_dump_json()
    if not marker.is_file():
        with FileLock(root.parent / f".{root.name}.lock"):
            if not marker.is_file():
                _generate(root, spec, progress)
    if marker.read_text() != wanted:
        raise DatasetError(
            f"{root} holds the synthetic set {marker.read_text()}, not {wanted}; delete it or "
            "set data.root to another folder"
        )
    return root


def _split_counts(spec: SyntheticSpec) -> dict[str, int]:
    return {"train": spec.train, "val": spec.val, "test": spec.test}


def _generate(root: Path, spec: SyntheticSpec, progress: bool) -> None:
    """Write the set beside `root`, then rename it into place (the lock is held)."""
    from segtune.data.synthetic import generate

    if root.exists() and any(root.iterdir()):
        counts = {
            split: spec_count for split, spec_count in _split_counts(spec).items() if spec_count
        }
        found = {split: len(list((root / split / "image").glob("syn_*"))) for split in counts}
        if found != counts or len(list(root.glob("*/mask/syn_*"))) != sum(counts.values()):
            raise DatasetError(
                f"{root} exists but holds no complete synthetic set ({SYNTHETIC_MARKER} is "
                f"missing and it has {found} images, not {counts}); delete it and run again"
            )
        # every file of the spec is there (an older segtune wrote no marker): the dataset
        # check before training still reads every header and mask
        stamp = root / f"{SYNTHETIC_MARKER}.{os.getpid()}"
        stamp.write_text(spec.model_dump_json())
        os.replace(stamp, root / SYNTHETIC_MARKER)  # readers outside the lock see all or nothing
        return
    log.info("generating the synthetic set at %s (%s)", root, spec)
    with folder_written_whole(root) as partial:
        generate(
            partial,
            n_train=spec.train,
            n_test=spec.test,
            n_val=spec.val,
            size=parse_hw(spec.size)[::-1],  # generate takes (width, height)
            seed=spec.seed,
            zoom=spec.zoom,
            progress=progress,
        )
        (partial / SYNTHETIC_MARKER).write_text(spec.model_dump_json())


Scan = dict[str, list[Sample]]  # checked pairs by split: train and the validation split


def _read_splits(data: DataConfig, root: Path) -> list[str]:
    """The splits a trial reads: train and, unless validation is a fraction of it, the
    validation split."""
    if isinstance(data.val_split, float):
        return ["train"]
    name = data.val_split
    if name == "auto":
        name = "val" if "val" in available_splits(root) else "test"
    if name not in available_splits(root):
        raise DatasetError(
            f"{root / name}: validation split '{name}' is missing; add it, or set "
            "data.val_split to a fraction of train such as 0.15"
        )
    return ["train", name]


def scan_dataset(data: DataConfig, progress: bool = True) -> Scan:
    """Every pair a trial reads, checked once (headers, mask values, class pixel counts). The
    sweep's driver scans once and hands the result to every trial."""
    root = ensure_dataset(data, progress)
    check = {"rgb_masks": data.rgb_masks, "progress": progress}
    return {split: scan_split(root, split, **check) for split in _read_splits(data, root)}


def cache_room(data: DataConfig, scan: Scan | None = None) -> str | None:
    """The pre-flight's line when this node has no room for `data.cache`'s decoded copy (sizes
    from `scan`, else from the image headers); None when it has, or there is no cache."""
    if not data.cache:
        return None
    root = ensure_dataset(data, progress=False)
    dataset = fingerprint(root, with_times=True)  # the node's own copy of the files
    needed = {
        cache_name(dataset, split, data.rgb_masks): decoded_bytes(
            [(s.width, s.height) for s in scan[split]] if scan else image_sizes(root, split)
        )
        for split in _read_splits(data, root)
    }
    return room_problem(data.cache_dir, needed)


def split_samples(
    data: DataConfig, seed: int = 0, progress: bool = True, scan: Scan | None = None
) -> tuple[list[Sample], list[Sample], str]:
    """Checked (train, validation) samples and the name of the validation source, from `scan`
    when the caller has one."""
    scan = scan or scan_dataset(data, progress)
    if isinstance(data.val_split, float):
        train, val = holdout(scan["train"], data.val_split, seed)
        return train, val, f"{data.val_split:.0%} of train"
    name = next(split for split in scan if split != "train")
    return scan["train"], scan[name], name


def _decoded(data: DataConfig, scan: Scan, progress: bool) -> dict[str, DecodedSplit | None]:
    """The node's decoded copy of each scanned split (decoded here if this process is the
    node's first), or None for each without `data.cache`."""
    if not data.cache:
        return dict.fromkeys(scan)
    dataset = fingerprint(data.root, with_times=True)
    names = {split: cache_name(dataset, split, data.rgb_masks) for split in scan}
    found = ensure_decoded(
        data.cache_dir, {names[split]: scan[split] for split in scan}, data.rgb_masks, progress
    )
    return {split: found[names[split]] for split in scan}


def build_data(
    data: DataConfig, trial: TrialConfig, progress: bool = True, scan: Scan | None = None
) -> DataBundle:
    """Datasets with the trial's augmentation preset, and seeded loaders."""
    scan = scan or scan_dataset(data, progress)
    train_samples, val_samples, val_name = split_samples(data, trial.seed, progress, scan)
    caches = _decoded(data, scan, progress)
    val_source = next((split for split in scan if split != "train"), "train")  # or a holdout
    train = SegmentationDataset(
        train_samples,
        train_transform(trial.augment, trial.image_size, seed=trial.seed),
        cache=caches["train"],
        rgb_masks=data.rgb_masks,
    )
    val = SegmentationDataset(
        val_samples,
        eval_transform(data.eval_resize, trial.eval_multiple),
        cache=caches[val_source],
        rgb_masks=data.rgb_masks,
    )
    loader = {"seed": trial.seed, "num_workers": trial.num_workers}
    return DataBundle(
        train=train,
        val=val,
        # drop_last keeps BatchNorm away from a last batch of one image
        train_loader=make_loader(
            train, trial.batch_size, shuffle=True, drop_last=len(train) > trial.batch_size, **loader
        ),
        val_loader=make_loader(val, trial.batch_size, shuffle=False, **loader),
        val_split=val_name,
        class_pixels=np.sum([s.class_pixels for s in train_samples], axis=0, dtype=np.int64),
    )
