"""The data layer: checks of the layout, presets, alignment of image and mask, loaders."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from segtune.classes import IGNORE_INDEX, PALETTE, colorize, rgb_to_mask
from segtune.data import (
    PRESETS,
    SegmentationDataset,
    eval_transform,
    holdout,
    make_loader,
    scan_split,
    set_epoch,
    train_transform,
)
from segtune.data import dataset as dataset_module
from segtune.data.dataset import read_image
from segtune.errors import DatasetError
from tests.helpers import random_pair, write_pair


def test_colorize_and_back() -> None:
    mask = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [255, 0, 1, 2]], dtype=np.uint8)
    rgb = colorize(mask)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == PALETTE[1] == (0, 0, 255)
    assert tuple(rgb[1, 3]) == (255, 255, 255)
    back = rgb_to_mask(rgb)
    assert (back[:2] == mask[:2]).all()
    assert (back[2, 0] == IGNORE_INDEX) and (back[2, 1:] == mask[2, 1:]).all()


def test_scan_split_finds_pairs(small_root: Path) -> None:
    samples = scan_split(small_root, "train", progress=False)
    assert [s.id for s in samples] == [f"t{i}" for i in range(6)]
    assert all((s.width, s.height) == (64, 48) for s in samples)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_for_every_preset(small_root: Path, preset: str, workers: int) -> None:
    samples = scan_split(small_root, "train", progress=False)
    dataset = SegmentationDataset(samples, train_transform(preset, 40, seed=1))
    batch = next(iter(make_loader(dataset, 4, shuffle=True, seed=3, num_workers=workers)))
    assert batch["image"].shape == (4, 3, 40, 40) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 40, 40) and batch["mask"].dtype == torch.uint8
    values = set(batch["mask"].unique().tolist())
    assert values <= set(range(8)) | {IGNORE_INDEX}
    assert len(batch["id"]) == 4


def _pattern(height: int, width: int, block: int = 12) -> np.ndarray:
    """Blocks of classes 1..7 (never black) so a shift between image and mask is measurable."""
    ys, xs = np.mgrid[0:height, 0:width]
    return (1 + ((ys // block) * 3 + (xs // block) * 5) % 7).astype(np.uint8)


def _decode_colours(image: np.ndarray) -> np.ndarray:
    palette = np.array(PALETTE, dtype=np.int32)
    dist = ((image[..., None, :].astype(np.int32) - palette) ** 2).sum(-1)
    return dist.argmin(-1)


@pytest.mark.parametrize("preset", PRESETS)
def test_image_and_mask_stay_aligned(preset: str) -> None:
    mask = _pattern(90, 120)
    image = colorize(mask)
    transform = train_transform(preset, 64, seed=0, photometric=False, normalize=False)
    agreements, padded_black = [], []
    for _ in range(25):
        out = transform(image=image, mask=mask)
        img, msk = np.asarray(out["image"]), np.asarray(out["mask"])
        # Interpolation blurs the image at block edges: compare away from them (1-px margin).
        interior = cv2.erode(msk, np.ones((3, 3), np.uint8)) == cv2.dilate(
            msk, np.ones((3, 3), np.uint8)
        )
        valid = interior & (msk != IGNORE_INDEX)
        agreements.append((_decode_colours(img)[valid] == msk[valid]).mean())
        padded = interior & (msk == IGNORE_INDEX)
        if padded.any():
            padded_black.append((img[padded].max(-1) < 60).mean())
    # A shift of 2 px between image and mask would cost ~15% agreement on 12-px blocks.
    assert min(agreements) > 0.98
    if padded_black:  # padding is black in the image and ignored in the mask, never class 0
        assert min(padded_black) > 0.98


def test_crop_pads_small_images_with_ignore() -> None:
    mask = np.full((20, 30), 4, np.uint8)
    out = train_transform("none", 32, seed=0, normalize=False)(image=colorize(mask), mask=mask)
    msk = np.asarray(out["mask"])
    assert msk.shape == (32, 32)
    assert set(np.unique(msk)) == {4, IGNORE_INDEX}
    assert (msk == IGNORE_INDEX).sum() == 32 * 32 - 20 * 30


def test_eval_transform_pads_to_multiple() -> None:
    rng = np.random.default_rng(0)
    image, mask = random_pair(rng, 75, 100)
    out = eval_transform("pad", 32)(image=image, mask=mask)
    assert tuple(out["image"].shape) == (3, 96, 128)
    msk = np.asarray(out["mask"])
    assert (msk[:75, :100] == mask).all() and (msk[75:] == IGNORE_INDEX).all()
    out = eval_transform("resize", 32)(image=image, mask=mask)
    assert tuple(out["image"].shape) == (3, 64, 96)


def test_loader_is_reproducible(small_root: Path) -> None:
    samples = scan_split(small_root, "train", progress=False)

    def first_batches(seed: int, workers: int) -> list[torch.Tensor]:
        dataset = SegmentationDataset(samples, train_transform("basic", 32, seed=seed))
        loader = make_loader(dataset, 2, shuffle=True, seed=seed, num_workers=workers)
        return [b["image"] for b in loader]

    a, b = first_batches(5, 0), first_batches(5, 2)  # the worker count changes nothing
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = first_batches(6, 0)
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_set_epoch_replays_an_epoch(small_root: Path) -> None:
    samples = scan_split(small_root, "train", progress=False)
    dataset = SegmentationDataset(samples, train_transform("strong", 32))
    loader = make_loader(dataset, 3, shuffle=True, seed=1, num_workers=2)
    epochs = []
    for epoch in range(3):
        set_epoch(loader, epoch)
        epochs.append([(b["id"], b["image"]) for b in loader])
    assert [ids for ids, _ in epochs[0]] != [ids for ids, _ in epochs[1]]
    fresh = make_loader(dataset, 3, shuffle=True, seed=1, num_workers=0)
    set_epoch(fresh, 2)  # a resumed run starting at epoch 2 sees epoch 2's batches
    for (ids, image), batch in zip(epochs[2], fresh, strict=True):
        assert ids == batch["id"] and torch.equal(image, batch["image"])


def test_workers_do_not_repeat_augmentation(tmp_path: Path) -> None:
    """Forked workers must not share albumentations' random state (identical crops)."""
    image, mask = random_pair(np.random.default_rng(1), 64, 64)
    for i in range(4):
        write_pair(tmp_path, "train", f"same{i}", image, mask, ext=".png")
    samples = scan_split(tmp_path, "train", progress=False)
    dataset = SegmentationDataset(samples, train_transform("none", 16, seed=0))
    batch = next(iter(make_loader(dataset, 1, shuffle=False, num_workers=2)))
    second = list(make_loader(dataset, 1, shuffle=False, num_workers=2))
    crops = [b["image"] for b in second]
    assert batch["image"].shape == (1, 3, 16, 16)
    assert not torch.equal(crops[0], crops[1]), "worker 0 and worker 1 drew the same crop"


def test_holdout_is_reproducible(small_root: Path) -> None:
    samples = scan_split(small_root, "train", progress=False)
    kept, held = holdout(samples, 0.34, seed=0)
    assert len(kept) == 4 and len(held) == 2
    assert not {s.id for s in kept} & {s.id for s in held}
    assert {s.id for s in kept} | {s.id for s in held} == {s.id for s in samples}
    assert holdout(samples, 0.34, seed=0) == (kept, held)
    with pytest.raises(DatasetError, match="fraction"):
        holdout(samples, 1.5, seed=0)


# Each user-caused problem raises DatasetError naming the offending file.


def _expect(root: Path, match: str, **kwargs: object) -> None:
    with pytest.raises(DatasetError, match=match):
        scan_split(root, "train", progress=False, **kwargs)


def test_missing_root(tmp_path: Path) -> None:
    _expect(tmp_path / "nowhere", "nowhere.*does not exist")
    (tmp_path / "afile").write_text("not a dataset")
    _expect(tmp_path / "afile", "afile is a file; point data.root at the dataset's folder")


def test_missing_folder_and_empty_split(tmp_path: Path) -> None:
    _expect(tmp_path, r"train/image is missing")
    (tmp_path / "train" / "image").mkdir(parents=True)
    (tmp_path / "train" / "mask").mkdir(parents=True)
    _expect(tmp_path, "empty")


def test_image_without_mask(small_root: Path) -> None:
    (small_root / "train" / "mask" / "t3.png").unlink()
    _expect(small_root, r"t3\.jpg: image has no mask")


def test_mask_without_image(small_root: Path) -> None:
    (small_root / "train" / "image" / "t2.jpg").unlink()
    _expect(small_root, r"t2\.png: mask has no image")


def test_size_mismatch(small_root: Path) -> None:
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(small_root / "train" / "mask" / "t1.png")
    _expect(small_root, r"t1\.png: mask is 64x40 but its image t1\.jpg is 64x48")


def test_mask_values_out_of_range(small_root: Path) -> None:
    bad = np.zeros((48, 64), np.uint8)
    bad[0, 0], bad[1, 1] = 9, 200
    Image.fromarray(bad).save(small_root / "train" / "mask" / "t0.png")
    _expect(small_root, r"t0\.png: mask values \[9, 200\] outside")


def test_rgb_mask_is_named_and_convertible(small_root: Path) -> None:
    mask = np.random.default_rng(0).integers(0, 8, (48, 64), dtype=np.uint8)
    Image.fromarray(colorize(mask)).save(small_root / "train" / "mask" / "t4.png")
    _expect(small_root, r"t4\.png: mask is RGB.*rgb_masks")
    samples = scan_split(small_root, "train", rgb_masks=True, progress=False)
    dataset = SegmentationDataset(samples, None, rgb_masks=True)
    assert (dataset.load(4)[1] == mask).all()


def test_truncated_image(small_root: Path) -> None:
    path = small_root / "train" / "image" / "t5.jpg"
    path.write_bytes(path.read_bytes()[:200])
    _expect(small_root, r"t5\.jpg: truncated JPEG")


def test_a_text_file_named_jpg_is_called_what_it_is(small_root: Path) -> None:
    path = small_root / "train" / "image" / "t5.jpg"
    path.write_bytes(b"not an image at all" + b"\xff\xd9")
    _expect(small_root, r"t5\.jpg: not a JPEG file \(it starts with b'not an i'\)")


def test_a_corrupt_body_behind_an_intact_header_and_end_is_found(small_root: Path) -> None:
    """Header and end-of-image marker intact, the entropy-coded body random bytes: only a full
    decode sees it, and the pre-flight does one, so no trial meets the file."""
    path = small_root / "train" / "image" / "t5.jpg"
    data = path.read_bytes()
    body = data.index(b"\xff\xda") + 20  # past the start-of-scan header
    noise = np.random.default_rng(0).integers(0, 256, len(data) - body - 2, dtype=np.uint8)
    path.write_bytes(data[:body] + noise.tobytes() + b"\xff\xd9")
    _expect(small_root, r"t5\.jpg: corrupt JPEG \(")


def test_a_body_that_decodes_into_noise_is_found(small_root: Path) -> None:
    """A body of other bytes with no marker in it: libjpeg decodes it without an error, into
    noise, with a warning only; which one depends on whether the noise runs out before the
    picture (a smooth one) or after it (a detailed one). Pictures that are whole pass in every
    JPEG flavour, and with a second picture after the first's end (MPF)."""
    path = small_root / "train" / "image" / "t5.jpg"
    rng = np.random.default_rng(0)
    detailed = rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)
    smooth = np.zeros((192, 256, 3), np.uint8)
    smooth[..., 0] = np.linspace(0, 255, 256, dtype=np.uint8)
    Image.fromarray(np.zeros((192, 256), np.uint8)).save(small_root / "train" / "mask" / "t5.png")
    flavours = [(detailed, "RGB", {}), (detailed, "RGB", {"progressive": True})]
    flavours += [(detailed[..., 0], "L", {}), (np.dstack([detailed, smooth[..., :1]]), "CMYK", {})]
    for pixels, mode, options in flavours:
        Image.fromarray(pixels, mode).save(path, "JPEG", quality=90, **options)
        read_image(path, strict=True)
    whole = path.read_bytes()
    path.write_bytes(whole + whole)
    read_image(path, strict=True)
    warnings = {"detailed": "extraneous bytes before marker", "smooth": "premature end of data"}
    for pixels, warning in zip((detailed, smooth), warnings.values(), strict=True):
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        data = path.read_bytes()
        body = data.index(b"\xff\xda") + 14  # past the start-of-scan header (3 components)
        noise = rng.integers(0, 255, len(data) - body - 2, dtype=np.uint8)  # no 0xff: no marker
        path.write_bytes(data[:body] + noise.tobytes() + b"\xff\xd9")
        _expect(small_root, rf"t5\.jpg: corrupt JPEG \(Corrupt JPEG data: .*{warning}")


def test_a_self_looping_symlink_is_named_as_such(small_root: Path) -> None:
    path = small_root / "train" / "image" / "t5.jpg"
    path.unlink()
    path.symlink_to(path.name)  # a link to itself
    _expect(small_root, r"t5\.jpg: a symlink that leads to no file \(broken, or a loop\)")


def test_a_device_or_pipe_is_named_as_such_not_as_missing(small_root: Path) -> None:
    """A mask that is a symlink to /dev/null would be skipped, and its image then reported
    "has no mask": the error names what the file is."""
    mask = small_root / "train" / "mask" / "t5.png"
    mask.unlink()
    mask.symlink_to("/dev/null")
    _expect(small_root, r"t5\.png: a symlink to /dev/null, a character device, not an image or")
    mask.unlink()
    os.mkfifo(mask)
    _expect(small_root, r"t5\.png: a FIFO \(named pipe\), not an image or mask file")
    _expect(Path("/dev/null"), "dataset root /dev/null is a character device; point data.root")


def test_a_decompression_bomb_is_refused_by_name(small_root: Path) -> None:
    """20000x20000 pixels in a 50 KB PNG: refused with the file's name, not a traceback."""
    path = small_root / "train" / "image" / "t5.png"
    (small_root / "train" / "image" / "t5.jpg").unlink()
    Image.new("1", (20000, 20000)).save(path)
    assert path.stat().st_size < 200_000
    _expect(small_root, r"t5\.png: unreadable image \(Image size \(400000000 pixels\) exceeds")
    with pytest.raises(DatasetError, match=r"t5\.png: unreadable image"):
        read_image(path)


def test_an_image_over_the_pixel_bound_is_refused(
    small_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataset_module, "MAX_PIXELS", 64 * 48 - 1)
    _expect(small_root, r"t0\.jpg: 64x48 is 0 megapixels, over the limit of 0; downscale")


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path: Path) -> None:
    """A 16-bit grey PNG reads as the 8-bit image it holds (convert("RGB") would make it white)."""
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    decoded = read_image(tmp_path / "deep.png")
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    assert (decoded == grey8[..., None]).all()


def test_truncated_mask(small_root: Path) -> None:
    path = small_root / "train" / "mask" / "t2.png"
    path.write_bytes(path.read_bytes()[:60])
    _expect(small_root, r"t2\.png: truncated PNG")
