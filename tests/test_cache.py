"""The node's decoded copy (data.cache): the same batches and mIoU as decoding every epoch, one
write per node, read-only maps handed to workers by path, room, and eviction."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from segtune.config.trial import DataConfig, trial_config
from segtune.data.cache import KEEP_OTHER, PIXELS, cache_name, ensure_decoded, room_problem
from segtune.data.dataset import fingerprint, scan_split
from segtune.data.loader import set_epoch
from segtune.data.pipeline import build_data, cache_room
from segtune.data.transforms import PRESETS
from segtune.models import build_model
from segtune.sweep.stall import STALL_ENV
from segtune.training.engine import fit, seed_everything
from segtune.training.losses import build_loss
from tests.helpers import mount_namespace_missing, start_driver
from tests.test_engine import TINY_UNET  # each test sets its augment
from tests.test_sweep import write_sweep


def _batches(loader: torch.utils.data.DataLoader, epochs: int = 2) -> list[dict]:
    out = []
    for epoch in range(epochs):
        set_epoch(loader, epoch)
        out.extend(loader)
    return out


@pytest.mark.parametrize(
    ("preset", "eval_resize"), list(zip(PRESETS, ["none", "pad", "resize"], strict=True))
)
def test_cache_gives_the_same_batches(
    synthetic_root: Path, tmp_path: Path, preset: str, eval_resize: str
) -> None:
    cfg = trial_config({**TINY_UNET, "augment": preset, "num_workers": 2})
    plain, cached = (
        build_data(
            DataConfig(
                root=str(synthetic_root),
                cache=cache,
                cache_dir=str(tmp_path),
                eval_resize=eval_resize,
            ),
            cfg,
            progress=False,
        )
        for cache in (False, True)
    )
    assert plain.train.cache is None and cached.train.cache is not None
    for loaders in ("train_loader", "val_loader"):
        want = _batches(getattr(plain, loaders))
        got = _batches(getattr(cached, loaders))
        assert len(want) == len(got) > 0
        for a, b in zip(want, got, strict=True):
            assert a["id"] == b["id"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


@pytest.mark.slow  # over 10 s on 2 cores: make test, not make check
def test_training_gives_the_same_miou(synthetic_root: Path, tmp_path: Path) -> None:
    cfg = trial_config({**TINY_UNET, "augment": "basic", "epochs": 2})
    results = []
    for cache in (False, True):
        data = build_data(
            DataConfig(root=str(synthetic_root), cache=cache, cache_dir=str(tmp_path)),
            cfg,
            progress=False,
        )
        seed_everything(cfg.seed, cfg.deterministic)
        result = fit(
            build_model(cfg), data.train_loader, data.val_loader, cfg, build_loss(cfg.loss)
        )
        results.append([epoch["val_miou"] for epoch in result.history])
    assert results[0] == results[1]
    assert results[0][-1] > 0


def test_one_write_then_maps_by_path(small_root: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    samples = scan_split(small_root, "train", progress=False)
    name = cache_name(fingerprint(small_root), "train", rgb_masks=False)
    first = ensure_decoded(str(cache_dir), {name: samples}, rgb_masks=False, progress=False)[name]
    written = (cache_dir / name / PIXELS).stat()
    assert written.st_size >= 6 * 64 * 48 * 4
    for sample in samples:  # read from the map from here on, never from the files
        sample.image_path.unlink()
    again = ensure_decoded(str(cache_dir), {name: samples}, rgb_masks=False, progress=False)[name]
    assert (cache_dir / name / PIXELS).stat().st_ino == written.st_ino  # not written twice
    image, mask = again.pair("t3")
    assert image.shape == (48, 64, 3) and mask.shape == (48, 64)
    np.testing.assert_array_equal(image, first.pair("t3")[0])
    assert not image.flags.writeable and not mask.flags.writeable  # as Pillow decodes them
    shipped = pickle.dumps(again)  # what a spawned DataLoader worker receives
    assert len(shipped) < 2000
    assert np.array_equal(pickle.loads(shipped).pair("t3")[1], mask)
    assert not [p for p in cache_dir.iterdir() if ".partial-" in p.name]


def test_a_file_edited_in_place_at_its_size_is_decoded_again(
    small_root: Path, tmp_path: Path
) -> None:
    """The cache outlives the sweep: a mask a user relabels in place (same name, same size)
    must not be read from the old copy."""
    mask = small_root / "train" / "mask" / "t3.png"
    pixels = np.asarray(Image.open(mask)).copy()
    Image.fromarray(pixels).save(mask, compress_level=0)  # stored: its size is its shape's
    data = DataConfig(root=str(small_root), cache=True, cache_dir=str(tmp_path / "cache"))
    cfg = trial_config({**TINY_UNET, "augment": "none"})
    before = build_data(data, cfg, progress=False).train.cache
    assert before is not None
    size = mask.stat().st_size
    pixels[:2, :2] = (pixels[:2, :2] + 1) % 10  # relabelled
    Image.fromarray(pixels).save(mask, compress_level=0)
    assert mask.stat().st_size == size
    after = build_data(data, cfg, progress=False).train.cache
    assert after is not None and after.path != before.path
    np.testing.assert_array_equal(after.pair("t3")[1], pixels)


def test_room_is_one_line(small_root: Path, tmp_path: Path) -> None:
    data = DataConfig(root=str(small_root), cache_dir=str(tmp_path / "not-yet"))
    assert cache_room(data) is None  # 8 small pairs fit
    huge = room_problem(str(tmp_path), {"segtune-decoded-v1-00-1-train": 1 << 60})
    assert huge is not None and len(huge.splitlines()) == 1
    assert huge.startswith("data.cache: the decoded copy of the data needs 1.15e+09 GB, ")
    assert f"GB free in {tmp_path};" in huge
    assert cache_room(data.model_copy(update={"cache": False})) is None


def test_a_node_without_room_is_one_line_before_any_trial(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """The cache folder is a 1 MB tmpfs of the driver's own; the decoded set takes 1.6 MB."""
    if missing := mount_namespace_missing():
        pytest.skip(missing)
    small = tmp_path / "small"
    small.mkdir()
    sweep = write_sweep(tmp_path / "room.yaml", synthetic_root, data={"cache_dir": str(small)})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_cmd = f"{sys.executable} -m segtune.run {sweep} --tracking-uri {uri} --no-report"
    mount = f"mount -t tmpfs -o size=1m tmpfs {small}"
    done = subprocess.run(
        ["unshare", "--mount", "--fork", "--", "sh", "-c", f"{mount} && exec {sweep_cmd}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if "error" in line] == [
        "error: data.cache: the decoded copy of the data needs 0.00157 GB, 0.00105 GB free in "
        f"{small}; set data.cache_dir to a node-local folder with room, or data.cache: false "
        "(decode every epoch)"
    ]
    assert not (tmp_path / "mlflow.db").exists()  # before any run


def test_other_datasets_are_removed_oldest_first(small_root: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    stranger = cache_dir / "segtune-decoded-notes.txt"  # not a cache's name: never touched
    stranger.write_text("mine")
    samples = scan_split(small_root, "test", progress=False)
    names = [f"segtune-decoded-v1-{i:016x}-8-test" for i in range(KEEP_OTHER + 3)]
    for age, name in enumerate(names):
        ensure_decoded(str(cache_dir), {name: samples}, rgb_masks=False, progress=False)
        os.utime(cache_dir / name, (age, age))  # the first is the least recently used
    kept = {p.name for p in cache_dir.iterdir()}
    # each write left the KEEP_OTHER most recent others; the rest went, oldest first
    assert kept == {stranger.name, *names[-(KEEP_OTHER + 1) :]}
    in_use = ensure_decoded(str(cache_dir), {names[-3]: samples}, False, False)[names[-3]]
    os.utime(cache_dir / names[-3], (0, 0))  # the oldest, but mapped by this process
    ensure_decoded(str(cache_dir), {"segtune-decoded-v1-ff-8-test": samples}, False, False)
    assert (cache_dir / names[-3]).is_dir()  # in use: stays
    assert in_use.pair("v0")[0].shape == (48, 64, 3)
    del in_use  # no longer mapped: the next write removes it
    ensure_decoded(str(cache_dir), {"segtune-decoded-v1-ee-8-test": samples}, False, False)
    assert not (cache_dir / names[-3]).exists()
    assert stranger.read_text() == "mine"


def _data_memory(driver: int, folder: Path) -> tuple[int, int, int]:
    """Of the trials under `driver` (their processes and loader workers): the summed PSS of
    their maps of `folder`, that of their memory with no file behind it, and how many trials
    map `folder`."""
    pss = anon = 0
    trials = set()
    for proc in psutil.Process(driver).children(recursive=True):
        try:
            if "ImplicitFunc" not in " ".join(proc.cmdline()):
                continue
            parent = proc.parent()
            trial = parent.pid if "ImplicitFunc" in " ".join(parent.cmdline()) else proc.pid
            for region in proc.memory_maps():
                if region.path.startswith(str(folder)):
                    pss += region.pss
                    trials.add(trial)
                elif not region.path.startswith("/"):  # [heap], [anon]: no file behind it
                    anon += region.pss
        except psutil.Error:  # ended between the listing and the read
            continue
    return pss, anon, len(trials)


@pytest.mark.launch  # a 4-trial sweep on ~80 MB: make test-cluster, and CI
def test_four_trials_on_a_node_hold_one_copy(tmp_path: Path) -> None:
    """Four trials at once, each with a loader worker, on one node: the proportional memory of
    all their maps of the cache is at most 1.3 copies (one copy is the cache's size)."""
    cache_dir = tmp_path / "cache"
    synthetic = {"train": 90, "test": 10, "size": "384x512"}  # 100 pairs of 0.79 MB decoded
    sweep = write_sweep(
        tmp_path / "shared.yaml",
        tmp_path / "data",
        data={"synthetic": synthetic, "cache_dir": str(cache_dir)},
        train={"epochs": 8, "num_workers": 1, "image_size": 96},
        tune={"repeats": 4, "max_concurrent_trials": 4, "resources_per_trial": {"cpu": 0.5}},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "segtune.run", str(sweep), "--tracking-uri", uri, "--no-report"]
    log = tmp_path / "driver.log"
    stall = {**os.environ, STALL_ENV: "600"}  # four trial processes start slowly on a busy CI
    driver = start_driver(cmd, log, tmp_path, env=stall)
    samples = []
    try:
        while driver.poll() is None:
            samples.append(_data_memory(driver.pid, cache_dir))
            time.sleep(0.5)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 0, log.read_text()[-3000:]
    copy = sum(p.stat().st_size for p in cache_dir.glob("segtune-decoded-*/*"))
    assert copy > 75e6
    together = [s for s in samples if s[2] == 4]
    assert together, f"never 4 trials mapping the cache at once: {samples}"
    peak = max(pss for pss, _, _ in together)
    print(f"one copy {copy / 1e6:.1f} MB; 4 trials' PSS of it at most {peak / 1e6:.1f} MB, "
          f"their anonymous PSS {max(a for _, a, _ in together) / 1e6:.0f} MB")  # fmt: skip
    assert 0.3 * copy < peak <= 1.3 * copy
