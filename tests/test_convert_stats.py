"""The FloodNet converter (class mapping, resizing, errors) and the dataset statistics tool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segtune.classes import CLASS_NAMES, IGNORE_INDEX
from segtune.cli import run_cli
from segtune.data import convert_floodnet, stats
from segtune.data.convert_floodnet import convert, convert_pair, floodnet_lut
from segtune.data.stats import class_pixel_shares, compute_stats
from segtune.errors import ConfigError, DatasetError

# FloodNet value -> our id, written out by hand (not derived from the module under test).
MERGE = {0: 0, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 4, 7: 5, 8: 6, 9: 7}
IGNORE = {**MERGE, 1: IGNORE_INDEX, 3: IGNORE_INDEX}


def _block_label(rng: np.random.Generator, height: int = 60, width: int = 80) -> np.ndarray:
    """Labels constant on 10x10 blocks: nearest-neighbour halving is then exact."""
    blocks = rng.integers(0, 10, (height // 10, width // 10), dtype=np.uint8)
    blocks.flat[:10] = np.arange(10)  # every FloodNet class occurs
    return np.kron(blocks, np.ones((10, 10), np.uint8))


def _write_floodnet(src: Path, split: str, sample_id: str, label: np.ndarray) -> None:
    image_dir, label_dir = src / split / f"{split}-org-img", src / split / f"{split}-label-img"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(len(sample_id)).integers(0, 256, (*label.shape, 3), np.uint8)
    Image.fromarray(rgb).save(image_dir / f"{sample_id}.jpg", quality=95)
    Image.fromarray(label).save(label_dir / f"{sample_id}_lab.png")


@pytest.fixture
def floodnet(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny release in the original layout: two train pairs and one test pair, 80x60."""
    rng = np.random.default_rng(0)
    labels = {}
    for split, sample_id in (("train", "6336"), ("train", "7001"), ("test", "8120")):
        labels[sample_id] = _block_label(rng)
        _write_floodnet(tmp_path / "FloodNet", split, sample_id, labels[sample_id])
    return tmp_path / "FloodNet", labels


@pytest.mark.parametrize(("mode", "mapping"), [("merge", MERGE), ("ignore", IGNORE)])
def test_convert_maps_classes_and_resizes(
    floodnet: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, mode: str, mapping: dict
) -> None:
    src, labels = floodnet
    dst = tmp_path / "out"
    assert convert(src, dst, width=40, flooded=mode, progress=False) == {"train": 2, "test": 1}
    lut = np.array([mapping[v] for v in range(10)], np.uint8)
    for split, sample_id in (("train", "6336"), ("train", "7001"), ("test", "8120")):
        with Image.open(dst / split / "image" / f"{sample_id}.jpg") as img:
            assert (img.mode, img.size) == ("RGB", (40, 30))
        with Image.open(dst / split / "mask" / f"{sample_id}.png") as img:
            assert (img.mode, img.size) == ("L", (40, 30))
            mask = np.asarray(img)
        np.testing.assert_array_equal(mask, lut[labels[sample_id][::2, ::2]])
    assert not (dst / "val").exists()


def test_convert_keeps_aspect_and_reports_ignored_share(
    floodnet: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    src, labels = floodnet
    image_path = src / "test" / "test-org-img" / "8120.jpg"
    label_path = src / "test" / "test-label-img" / "8120_lab.png"
    image, mask = convert_pair(image_path, label_path, 20, floodnet_lut("merge"))
    assert image.shape == (15, 20, 3) and mask.shape == (15, 20)
    convert(src, tmp_path / "out", width=40, flooded="ignore", progress=False)
    shares = class_pixel_shares(tmp_path / "out", "train")
    flooded = np.mean([np.isin(labels[i], (1, 3)).mean() for i in ("6336", "7001")])
    assert shares["ignored"] == pytest.approx(flooded)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_convert_errors(floodnet: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    src, _ = floodnet
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "o1", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no FloodNet split found"):
        convert(tmp_path / "empty", tmp_path / "o2", progress=False)
    with pytest.raises(ConfigError, match="--width 0"):
        convert(src, tmp_path / "o3", width=0, progress=False)
    with pytest.raises(ConfigError, match="--flooded 'keep'"):
        convert(src, tmp_path / "o3", flooded="keep", progress=False)

    bad = _block_label(np.random.default_rng(1))
    bad[0, 0] = 12
    _write_floodnet(src, "val", "9000", bad)
    with pytest.raises(DatasetError, match=r"9000_lab.png: label value 12 > 9"):
        convert(src, tmp_path / "o4", width=40, progress=False)

    (src / "val" / "val-label-img" / "9000_lab.png").unlink()
    with pytest.raises(DatasetError, match=r"val-org-img/9000.jpg: no label .*9000_lab.png"):
        convert(src, tmp_path / "o5", width=40, progress=False)


def test_convert_label_size_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "FloodNet"
    _write_floodnet(src, "train", "1", _block_label(np.random.default_rng(2)))
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(
        src / "train" / "train-label-img" / "1_lab.png"
    )
    with pytest.raises(DatasetError, match="label is 40x30 but 1.jpg is 80x60"):
        convert(src, tmp_path / "out", width=40, progress=False)


def test_convert_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "missing"), str(tmp_path / "out"), "--quiet"]
    assert run_cli(convert_floodnet.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: FloodNet folder") and "missing" in err and "\n" not in err


def test_stats_on_a_synthetic_set(synthetic_root: Path) -> None:
    table = compute_stats(synthetic_root)
    assert list(table.index) == ["train", "test"]
    assert table.loc["train", "images"] == 24 and table.loc["test", "images"] == 8
    assert table.loc["train", "sizes"] == "128x96"
    shares = table[[*CLASS_NAMES, "ignored"]]
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    assert (shares["ignored"] == 0).all()
    assert shares.loc["train", "grass"] == shares.loc["train"].max()
    assert class_pixel_shares(synthetic_root, "test") == pytest.approx(shares.loc["test"].to_dict())


def test_stats_cli_table_and_plot(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "charts" / "shares.png"
    assert run_cli(stats.main, [str(synthetic_root), "--plot", str(plot), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pixel share (%)" in out
    assert all(name in out for name in (*CLASS_NAMES, "ignored", "train", "test", "128x96"))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as img:
        assert img.size[0] > 300 and img.size[1] > 200
    under_a_file = plot / "again.png"
    assert run_cli(stats.main, [str(synthetic_root), "--plot", str(under_a_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --plot {plot}: {plot} is a file, not a folder"


def test_stats_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(stats.main, [str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dataset root") and "absent" in err and "\n" not in err
    with pytest.raises(DatasetError, match="absent"):
        compute_stats(tmp_path / "absent")
    with pytest.raises(DatasetError, match="holds none of"):
        compute_stats(tmp_path)
    (tmp_path / "train" / "mask").mkdir(parents=True)
    (tmp_path / "train" / "image").mkdir()
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(tmp_path / "train" / "mask" / "a.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "image" / "a.jpg")
    with pytest.raises(DatasetError, match=r"mask values \[9\]"):
        compute_stats(tmp_path)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "train" / "mask" / "b.png")
    (tmp_path / "train" / "mask" / "a.png").unlink()
    with pytest.raises(DatasetError, match="a.jpg: image has no mask"):
        compute_stats(tmp_path)
