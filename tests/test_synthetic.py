"""The synthetic aerial generator: layout, determinism, class statistics and its command line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segtune.classes import CLASS_NAMES, NUM_CLASSES
from segtune.cli import run_cli
from segtune.config.trial import DataConfig
from segtune.data.pipeline import ensure_dataset
from segtune.data.synthetic import generate, main, render_scene
from segtune.errors import ConfigError, DatasetError

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_types_and_values(tmp_path: Path) -> None:
    root = generate(tmp_path / "ds", n_train=6, n_test=2, size=(128, 96), seed=0, progress=False)
    assert not (root / "val").exists()
    ids = {}
    for split, n in (("train", 6), ("test", 2)):
        images = sorted((root / split / "image").iterdir())
        masks = sorted((root / split / "mask").iterdir())
        assert len(images) == len(masks) == n
        assert [p.stem for p in images] == [p.stem for p in masks]
        assert all(p.suffix == ".jpg" for p in images) and all(p.suffix == ".png" for p in masks)
        ids[split] = {p.stem for p in images}
        for image_path, mask_path in zip(images, masks, strict=True):
            with Image.open(image_path) as img:
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (128, 96))
            with Image.open(mask_path) as img:
                assert (img.format, img.mode, img.size) == ("PNG", "L", (128, 96))
                mask = np.asarray(img)
            assert set(np.unique(mask)) <= set(range(NUM_CLASSES))
    assert ids["train"] == {f"syn_{i:06d}" for i in range(6)}
    assert ids["test"] == {"syn_000006", "syn_000007"}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    a = _files(generate(tmp_path / "a", 2, 1, size=(96, 64), seed=3, n_val=1, progress=False))
    b = _files(generate(tmp_path / "b", 2, 1, size=(96, 64), seed=3, n_val=1, progress=False))
    c = _files(generate(tmp_path / "c", 2, 1, size=(96, 64), seed=4, n_val=1, progress=False))
    assert len(a) == 8 and "val/mask/syn_000002.png" in a
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


@pytest.mark.parametrize("size", [(32, 32), (57, 33), (40, 120)])
def test_render_scene_any_size(size: tuple[int, int]) -> None:
    width, height = size
    for i in range(5):
        image, mask = render_scene(np.random.default_rng([0, i]), width, height)
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        assert mask.max() < NUM_CLASSES


def test_class_frequencies_are_plausible() -> None:
    counts = np.zeros(NUM_CLASSES, np.int64)
    for i in range(40):
        image, mask = render_scene(np.random.default_rng([7, i]), 256, 192)
        counts += np.bincount(mask.ravel(), minlength=NUM_CLASSES)
        # Natural colours, not the palette: no class is drawn in its label colour.
        assert image.std() > 10
    shares = dict(zip(CLASS_NAMES, counts / counts.sum(), strict=True))
    assert all(share > 0 for share in shares.values()), shares
    assert shares["vehicle"] < 0.02
    assert max(shares, key=shares.__getitem__) == "grass"
    assert 0.3 < shares["grass"] < 0.7


def test_class_colours_overlap_but_differ() -> None:
    """Pools are brighter and bluer than ponds on average, yet each class's colour varies."""
    pixels: dict[str, list[np.ndarray]] = {name: [] for name in CLASS_NAMES}
    for i in range(30):
        image, mask = render_scene(np.random.default_rng([11, i]), 192, 144)
        for k, name in enumerate(CLASS_NAMES):
            pixels[name].append(image[mask == k].astype(np.float32))
    mean = {name: np.concatenate(p).mean(axis=0) for name, p in pixels.items()}
    std = {name: np.concatenate(p).std(axis=0) for name, p in pixels.items()}
    assert mean["pool"][2] > mean["water"][2] + 40
    assert mean["grass"][1] > mean["grass"][2]
    assert all(std[name].mean() > 5 for name in CLASS_NAMES), std


def test_refuses_to_mix_sets_and_overwrites_its_own(tmp_path: Path) -> None:
    generate(tmp_path, 2, 1, size=(64, 48), seed=0, progress=False)
    with pytest.raises(DatasetError, match="already holds 2 files"):
        generate(tmp_path, 1, 1, size=(64, 48), seed=1, progress=False)
    generate(tmp_path, 1, 1, size=(64, 48), seed=1, progress=False, overwrite=True)
    assert [p.name for p in sorted((tmp_path / "train" / "image").iterdir())] == ["syn_000000.jpg"]
    (tmp_path / "test" / "image" / "mine.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="did not write.*mine.jpg"):
        generate(tmp_path, 1, 1, size=(64, 48), progress=False, overwrite=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train": -1, "n_test": 1}, "non-negative"),
        ({"n_train": 0, "n_test": 0}, "at least one image"),
        ({"n_train": 1, "n_test": 1, "size": (16, 48)}, "at least 32"),
        ({"n_train": 1, "n_test": 1, "seed": -2}, "seed -2"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())


def test_cli_bad_size_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(main, ["--out", str(tmp_path), "--size", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: invalid input size 'bogus': write it as WIDTHxHEIGHT")
    assert "\n" not in err.strip()


def test_python_m_writes_a_set_and_fails_without_traceback(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "segtune.data.synthetic", "--out", str(tmp_path / "ds")]
    ok = subprocess.run(
        [*cmd, "--train", "2", "--test", "1", "--size", "64x48", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "ds" / "train" / "mask").glob("syn_*.png"))) == 2
    assert "wrote 2 train, 0 val and 1 test images of 64x48" in ok.stderr
    bad = subprocess.run(
        [*cmd, "--train", "2", "--test", "1", "--size", "64x48"],  # the set exists now
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--overwrite" in bad.stderr


def test_two_processes_generate_one_complete_set(tmp_path: Path) -> None:
    """Two trials of a fresh node ask for the same synthetic set at once: one writes it (beside
    the root, then renamed into place, under a lock), the other waits; never half a set."""
    spec = {"train": 6, "test": 2, "size": "96x64", "seed": 3}
    root = tmp_path / "set"
    code = (
        "from segtune.config.trial import DataConfig\n"
        "from segtune.data.pipeline import ensure_dataset\n"
        f"ensure_dataset(DataConfig(root={str(root)!r}, synthetic={spec!r}), progress=False)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in "ab"]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    reference = generate(
        tmp_path / "ref", n_train=6, n_test=2, size=(96, 64), seed=3, progress=False
    )

    def files(folder: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }

    assert files(root) == files(reference) and len(files(root)) == 2 * (6 + 2)
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


def test_a_half_written_set_is_not_taken_for_a_complete_one(tmp_path: Path) -> None:
    root = tmp_path / "set"
    generate(root, n_train=2, n_test=1, size=(64, 48), seed=0, progress=False)  # no marker
    (root / "test" / "image" / "syn_000002.jpg").unlink()  # as if interrupted
    data = DataConfig(root=str(root), synthetic={"train": 2, "test": 1, "size": "64x48"})
    with pytest.raises(DatasetError, match="no complete synthetic set"):
        ensure_dataset(data, progress=False)
    # a complete set an older segtune wrote (no marker) is taken as it is
    shutil.rmtree(root)
    generate(root, n_train=2, n_test=1, size=(64, 48), seed=0, progress=False)
    assert ensure_dataset(data, progress=False) == root
    other = DataConfig(
        root=str(root), synthetic={"train": 2, "test": 1, "size": "64x48", "seed": 1}
    )
    with pytest.raises(DatasetError, match="delete it or set data.root"):
        ensure_dataset(other, progress=False)
