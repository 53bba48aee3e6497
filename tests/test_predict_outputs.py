"""predict's output plan, checked before any work: it never writes over an input, never writes
one path twice, and names a device or a pipe for what it is.

Every refusal here comes before the export folder is read (the folder named does not exist),
so these run without a model; tests/test_export.py runs predict for real and checks its counts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segtune.cli import run_cli
from segtune.predict import main as predict_main

NO_EXPORT = "no-such-export"  # a refusal that came after the plan would name this instead


def image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its SHA-256: the same before and after means untouched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: object) -> str:
    code = run_cli(predict_main, [str(tmp_path / NO_EXPORT), *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert NO_EXPORT not in err, err
    return err


def test_out_equal_to_the_input_folder_is_refused_and_the_inputs_are_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    image(photos / "photo.png")
    image(photos / "field.jpg", seed=1)
    before = snapshot(photos)
    (tmp_path / "link").symlink_to(photos)
    (tmp_path / "sub").mkdir()
    for out in (photos, tmp_path / "link", tmp_path / "sub" / ".." / "photos"):
        err = refused(capsys, tmp_path, photos, "--out", out, "--overlay")
        assert f"--out {out}: is the input folder {photos}" in err
    assert snapshot(photos) == before


def test_an_output_that_is_an_input_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An input named as a file, --out its folder: its mask would be the input itself. A hard
    link is the same file under another name."""
    photo = image(tmp_path / "photos" / "photo.png")
    before = photo.read_bytes()
    err = refused(capsys, tmp_path, photo, "--out", photo.parent)
    assert err == (
        f"error: --out {photo.parent}: {photo} is the input {photo}; predict never writes over "
        "an input: choose another --out"
    )
    masks = tmp_path / "masks"
    masks.mkdir()
    os.link(photo, masks / "other.png")
    other = image(tmp_path / "more" / "other.jpg", seed=2)  # it writes masks/other.png
    err = refused(capsys, tmp_path, photo, other, "--out", masks)
    assert f"{masks / 'other.png'} is the input {photo}" in err
    assert photo.read_bytes() == before


def test_colliding_outputs_are_named_before_any_file_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    a, a_overlay = image(inputs / "a.jpg"), image(inputs / "a_overlay.jpg", seed=1)
    out = tmp_path / "out"
    err = refused(capsys, tmp_path, inputs, "--out", out, "--overlay")
    assert err == (
        f"error: {a} and {a_overlay} would both write a_overlay.png; rename one, or predict "
        "them into different --out folders"
    )
    assert not out.exists()

    image(tmp_path / "twin" / "a.png", seed=3)  # same stem, other folder
    image(tmp_path / "case" / "A.jpg", seed=4)  # one file on a case-insensitive filesystem
    err = refused(capsys, tmp_path, a, tmp_path / "twin", tmp_path / "case", "--out", out)
    assert f"{a} and {tmp_path / 'twin' / 'a.png'} would both write a.png (and 1 more)" in err
    err = refused(capsys, tmp_path, a, tmp_path / "case", "--out", out)
    assert f"{a} and {tmp_path / 'case' / 'A.jpg'} would both write a.png and A.png" in err
    err = refused(capsys, tmp_path, inputs, a, "--out", out)
    assert f"{a} is named twice (it would write a.png twice)" in err
    assert not out.exists()


def test_a_device_or_pipe_is_named_for_what_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    err = refused(capsys, tmp_path, "/dev/null", "--out", out)
    assert err == "error: /dev/null: a character device, not an image file"
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    err = refused(capsys, tmp_path, tmp_path / "zero.jpg", "--out", out)
    assert err.endswith("zero.jpg: a symlink to /dev/zero, a character device, not an image file")
    os.mkfifo(tmp_path / "pipe.png")  # reading it would wait forever
    err = refused(capsys, tmp_path, tmp_path / "pipe.png", "--out", out)
    assert err.endswith("pipe.png: a FIFO (named pipe), not an image file")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    err = refused(capsys, tmp_path, tmp_path / "gone.png", "--out", out)
    assert err.endswith(
        "gone.png: a symlink that leads nowhere (broken, or a loop), not an image file"
    )
    assert refused(capsys, tmp_path, tmp_path / "nope.png", "--out", out).endswith(
        "nope.png: no such file or folder"
    )

    folder = tmp_path / "folder"  # in a named folder: skipped with a warning that says why
    folder.mkdir()
    (folder / "zero.jpg").symlink_to("/dev/zero")
    err = refused(capsys, tmp_path, folder, "--out", out)
    assert err == f"error: no images in {folder}"
    assert "zero.jpg: a symlink to /dev/zero, a character device, not an image file" in caplog.text

    photo = image(tmp_path / "photo.jpg")
    err = refused(capsys, tmp_path, photo, "--out", "/dev/null")
    assert err == "error: --out /dev/null: /dev/null is a character device, not a folder"
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    err = refused(capsys, tmp_path, photo, "--out", tmp_path / "broken")
    assert "broken is a symlink that leads nowhere (broken, or a loop), not a folder" in err
    assert not out.exists()


def test_an_output_name_taken_by_a_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = image(tmp_path / "in" / "photo.jpg")
    out = tmp_path / "out"
    (out / "photo_overlay.png").mkdir(parents=True)
    err = refused(capsys, tmp_path, photo, "--out", out, "--overlay")
    assert err == (
        f"error: --out {out}: {out / 'photo_overlay.png'} is a folder, not a mask file; move it "
        "or choose another --out"
    )
