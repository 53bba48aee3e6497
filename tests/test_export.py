"""Export and predict on one real tiny sweep (local Ray, sqlite MLflow), run once for the module.

Test images are 100x70, not multiples of 32: the trial's evaluation padded them to 128x96, so
predict must pad and crop back the same way to reproduce the recorded mIoU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from PIL import Image

from segtune.classes import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, PALETTE
from segtune.cli import run_cli
from segtune.config.constraints import parse_constraints
from segtune.config.names import ROLE_TAG
from segtune.data.dataset import read_image, read_mask
from segtune.deploy.bundle import export_files
from segtune.deploy.convert import checkpoint_model
from segtune.deploy.runtime import Preprocess, blend_window, predict_scores, tile_starts
from segtune.export import ExportResult, export
from segtune.export import main as export_main
from segtune.models.checkpoint import load_checkpoint
from segtune.predict import main as predict_main
from segtune.tracking.query import load_sweep_table
from segtune.tracking.runs import TrialRun, start_sweep_run
from segtune.tracking.select import rank_trials
from segtune.training.metrics import ConfusionMatrix
from tests.test_predict_outputs import image, snapshot
from tests.test_sweep import run, trial_runs, write_sweep

EXPERIMENT = "exp"
MODEL_NAME = "segtune-test"
FILES = {"model.pt", "model.onnx", "best.pt", "model_card.json", "README.md", "SHA256SUMS"}


@dataclass
class Sweep:
    folder: Path
    data: Path
    uri: str
    runs: dict[str, Run]  # arch -> the trial's MLflow run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    from segtune.data.synthetic import generate

    folder = tmp_path_factory.mktemp("export")
    data = generate(folder / "data", n_train=8, n_test=4, size=(100, 70), seed=0, progress=False)
    path = write_sweep(
        folder / f"{EXPERIMENT}.yaml",
        data,
        train={"epochs": 2, "image_size": 64},
        search_space={
            "model": {
                "grid_search": [
                    {"arch": "unet", "backbone": "none"},
                    {"arch": "deeplabv3", "backbone": "mobilenet_v3_small"},
                ]
            }
        },
        tune={"max_concurrent_trials": 2},
    )
    proc = run(path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r.data.params["arch"]: r for r in trial_runs(folder, EXPERIMENT)}
    return Sweep(folder, data, f"sqlite:///{folder / 'mlflow.db'}", runs)


@pytest.fixture(scope="module")
def exported(sweep: Sweep) -> ExportResult:
    return export(
        experiment=EXPERIMENT,
        out=sweep.folder / "exports" / EXPERIMENT,
        register_as=MODEL_NAME,
        tracking_uri=sweep.uri,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_best(sweep: Sweep) -> Run:
    runs = list(sweep.runs.values())
    return max(runs, key=lambda r: (r.data.metrics["best_val_miou"], -r.data.metrics["size_mb"]))


def test_export_writes_the_best_trial_with_checksums(sweep: Sweep, exported: ExportResult) -> None:
    out, card = exported.out, exported.card
    best = expected_best(sweep)
    assert card["source"]["run_id"] == best.info.run_id
    assert card["source"]["sweep_run_id"] == best.data.tags["mlflow.parentRunId"]
    assert {p.name for p in out.iterdir()} == FILES
    sums = dict(
        reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines()
    )
    assert set(sums) == FILES - {"SHA256SUMS"}
    assert all(sha256(out / name) == digest for name, digest in sums.items())

    original = MlflowClient(sweep.uri).download_artifacts(
        best.info.run_id, "checkpoints/best.pt", str(sweep.folder / "original")
    )
    assert sha256(out / "best.pt") == sha256(Path(original)), "best.pt must be unchanged"

    assert [c["name"] for c in card["classes"]] == list(CLASS_NAMES)
    assert [tuple(c["color"]) for c in card["classes"]] == list(PALETTE)
    spec = card["input"]
    assert spec["mean"] == pytest.approx(list(IMAGENET_MEAN))
    assert spec["std"] == pytest.approx(list(IMAGENET_STD))
    assert (spec["resize"], spec["multiple"]) == ("pad", 32)
    assert card["metrics"]["best_val_miou"] == pytest.approx(best.data.metrics["best_val_miou"])
    assert card["cost"]["size_mb"] == pytest.approx(best.data.metrics["size_mb"])
    assert card["cost"]["conditions"]["bench_input"] == "96x64"
    assert card["data"]["root"] == str(sweep.data)
    assert card["model"]["arch"] == best.data.params["arch"]
    text = (out / "README.md").read_text()
    assert best.info.run_id in text and "multiple of 32" in text and "| 7 | grass |" in text


def test_torchscript_and_onnx_equal_the_checkpoint_model(exported: ExportResult) -> None:
    import onnxruntime as ort

    model, _ = checkpoint_model(load_checkpoint(exported.out / "best.pt"))
    scripted = torch.jit.load(str(exported.out / "model.pt"))
    session = ort.InferenceSession(str(exported.out / "model.onnx"))
    generator = torch.Generator().manual_seed(7)
    for hw in ((64, 96), (96, 128)):
        x = torch.randn(1, 3, *hw, generator=generator)
        with torch.inference_mode():
            expected, got = model(x), scripted(x)
        onnx = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert expected.shape == (1, len(CLASS_NAMES), *hw)
        assert float((got - expected).abs().max()) <= 1e-4, hw
        assert float((onnx - expected).abs().max()) <= 1e-4, hw
    check = exported.card["export"]["verification"]
    assert {"torchscript_max_abs_diff", "onnx_max_abs_diff"} <= set(check)  # recorded in the card


def score_masks(sweep: Sweep, masks: Path) -> float:
    """The trial's metric: mIoU over the whole split's confusion matrix."""
    matrix = ConfusionMatrix()
    for truth_path in sorted((sweep.data / "test" / "mask").iterdir()):
        prediction = np.array(Image.open(masks / truth_path.name))
        truth = read_mask(truth_path)
        assert prediction.shape == truth.shape  # padding cropped back
        matrix.update(torch.from_numpy(prediction)[None], torch.from_numpy(truth)[None])
    return matrix.compute()["miou"]


def test_predict_reproduces_the_recorded_miou(
    sweep: Sweep, exported: ExportResult, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = tmp_path / "images"
    shutil.copytree(sweep.data / "test" / "image", images)
    (images / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        code = predict_main([str(exported.out), str(images), "--out", str(tmp_path / "ts")])
    assert code == 0
    assert any(
        "notes.txt" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records
    )
    recorded = exported.card["metrics"]["best_val_miou"]
    # Same preprocessing, same weights, same metric: only float summation order differs
    # (batch of 4 in the trial, 1 here), which can flip the argmax of a near-tie pixel.
    assert score_masks(sweep, tmp_path / "ts") == pytest.approx(recorded, abs=1e-3)

    argv = [str(exported.out), str(images), "--out", str(tmp_path / "onnx"), "--onnx"]
    assert predict_main([*argv, "--overlay"]) == 0
    for mask in sorted((tmp_path / "ts").glob("*.png")):
        ts, onnx = (
            np.asarray(Image.open(mask)),
            np.asarray(Image.open(tmp_path / "onnx" / mask.name)),
        )
        assert Image.open(mask).mode == "L" and (ts == onnx).mean() > 0.999
        overlay = np.asarray(Image.open(tmp_path / "onnx" / f"{mask.stem}_overlay.png"))
        assert overlay.shape == (*ts.shape, 3)


def test_tampered_files_are_refused(
    exported: ExportResult, sweep: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(exported.out, folder)
    image = next((sweep.data / "test" / "image").iterdir())
    for name, extra in (("model.pt", []), ("model.onnx", ["--onnx"]), ("model_card.json", [])):
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        code = run_cli(predict_main, [str(folder), str(image), "--out", str(tmp_path), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err
        assert f"{folder / name}: SHA-256 does not match" in err, err
        (folder / name).write_bytes(original)
    (folder / "SHA256SUMS").unlink()
    assert run_cli(predict_main, [str(folder), str(image), "--out", str(tmp_path)]) == 2
    assert "SHA256SUMS: missing" in capsys.readouterr().err


def test_predict_refuses_a_bomb_and_writes_no_empty_folder(
    exported: ExportResult,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 20000x20000 PNG and a JPEG whose body decodes into noise: skipped with their names,
    exit 2, and no output folder; a 16-bit image is scaled to 8 bits, so its mask is the mask
    of its 8-bit twin."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    noise = tmp_path / "noise.jpg"
    Image.new("RGB", (256, 192), (90, 140, 60)).save(noise, "JPEG")
    data = noise.read_bytes()
    body = data.index(b"\xff\xda") + 14  # past the start-of-scan header
    filler = np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes()
    noise.write_bytes(data[:body] + filler + b"\xff\xd9")
    out = tmp_path / "masks"
    with caplog.at_level(logging.WARNING):
        code = run_cli(predict_main, [str(exported.out), str(bomb), str(noise), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "no readable image among 2 file(s)" in err and "Traceback" not in err
    assert "bomb.png: unreadable image (Image size (400000000 pixels) exceeds" in caplog.text
    assert "noise.jpg: corrupt JPEG (Corrupt JPEG data:" in caplog.text
    assert not out.exists()
    rgb = np.random.default_rng(1).integers(0, 256, (64, 96), dtype=np.uint8)
    Image.fromarray(rgb).convert("RGB").save(tmp_path / "eight.png")
    Image.fromarray(rgb.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    args = [str(exported.out), str(tmp_path / "eight.png"), str(tmp_path / "sixteen.png")]
    assert predict_main([*args, "--out", str(out)]) == 0
    eight, sixteen = (np.asarray(Image.open(out / f"{n}.png")) for n in ("eight", "sixteen"))
    assert (eight == sixteen).all()
    taken = tmp_path / "taken.txt"  # an output folder that cannot be one: refused before any work
    taken.write_text("mine")
    assert run_cli(predict_main, [*args, "--out", str(taken / "masks")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {taken / 'masks'}: {taken} is a file, not a folder"


def test_tiles_blend_like_the_whole_image(exported: ExportResult) -> None:
    starts = tile_starts(300, 96, 32)
    assert (
        starts[0] == 0
        and starts[-1] == 300 - 96
        and all(b - a <= 64 for a, b in zip(starts[:-1], starts[1:], strict=True))
    )
    assert tile_starts(50, 96, 32) == [0]
    window = blend_window(96, 96, 32)
    assert float(window.min()) > 0 and float(window[48, 48]) == 1.0

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
    preprocess = Preprocess(IMAGENET_MEAN, IMAGENET_STD)
    # a per-pixel model: every tile sees exactly what the whole image sees, so blending the
    # tiles' softmaxes must give the whole image's softmax
    pointwise = torch.nn.Conv2d(3, len(CLASS_NAMES), 1).eval()
    with torch.inference_mode():
        whole = predict_scores(pointwise, image, preprocess).softmax(0)
        tiled = predict_scores(pointwise, image, preprocess, tile=64, overlap=16)
    assert tiled.shape == whole.shape == (len(CLASS_NAMES), 150, 230)
    assert torch.allclose(tiled, whole, atol=1e-5)
    assert torch.allclose(tiled.sum(0), torch.ones(150, 230), atol=1e-5)

    scripted = torch.jit.load(str(exported.out / "model.pt"))
    preprocess = Preprocess.from_card(exported.card)
    with torch.inference_mode():
        whole = predict_scores(scripted, image, preprocess).argmax(0)
        tiled = predict_scores(scripted, image, preprocess, tile=96, overlap=32).argmax(0)
    assert tiled.shape == (150, 230) and float((tiled == whole).float().mean()) > 0.8


def test_register_tags_the_version(sweep: Sweep, exported: ExportResult) -> None:
    import mlflow

    client = MlflowClient(sweep.uri)
    version = client.get_model_version(MODEL_NAME, str(exported.registered_version))
    best = expected_best(sweep)
    assert version.tags["source_run_id"] == best.info.run_id
    assert float(version.tags["best_val_miou"]) == pytest.approx(
        best.data.metrics["best_val_miou"], rel=1e-5
    )
    assert "size_mb" in version.tags and "infer_ms_cpu" in version.tags
    export_run = client.get_run(version.run_id)
    assert export_run.data.tags[ROLE_TAG] == "export"
    assert export_run.data.tags["mlflow.parentRunId"] == best.info.run_id
    # the export run is no trial: the dashboards still see two
    assert len(load_sweep_table(EXPERIMENT, sweep.uri)) == 2
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(sweep.uri)  # models:/ URIs resolve against the global registry
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{exported.registered_version}")
    finally:
        mlflow.set_tracking_uri(previous)
    out = model.predict(np.zeros((1, 3, 70, 90), dtype=np.float32))
    assert out.shape == (1, len(CLASS_NAMES), 70, 90)


def test_run_id_budget_and_ties_choose_the_trial(
    sweep: Sweep, exported: ExportResult, tmp_path: Path
) -> None:
    other = next(
        r for r in sweep.runs.values() if r.info.run_id != exported.card["source"]["run_id"]
    )
    result = export(
        experiment=None,
        run_id=other.info.run_id,
        out=tmp_path / "by-id",
        formats=["torchscript"],
        tracking_uri=sweep.uri,
    )
    assert result.card["source"]["run_id"] == other.info.run_id
    assert result.card["source"]["selection"] == {"by": "run-id"}
    assert result.card["files"]["onnx"] is None and not (result.out / "model.onnx").exists()

    unet, deeplab = sweep.runs["unet"], sweep.runs["deeplabv3"]
    table = load_sweep_table(EXPERIMENT, sweep.uri)
    columns = [c for c in table.columns if c in unet.data.metrics]
    small = unet.data.metrics["size_mb"]
    within = rank_trials(table, constraints=parse_constraints(f"size_mb<={small * 1.01}"))
    assert within["run_id"].tolist() == [unet.info.run_id]
    table["best_val_miou"] = 0.5  # a tie: the smaller model wins
    assert rank_trials(table, metric_columns=columns).iloc[0]["run_id"] == unet.info.run_id
    table.loc[table["run_id"] == unet.info.run_id, "best_val_miou"] = 0.4
    assert rank_trials(table).iloc[0]["run_id"] == deeplab.info.run_id
    assert rank_trials(table, mode="min").iloc[0]["run_id"] == unet.info.run_id


def test_export_errors_exit_2(
    sweep: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(sweep.uri)
    parent = start_sweep_run(client, "broken", "broken", "name: broken\n")
    trial = TrialRun.open(
        client,
        experiment="broken",
        parent_run_id=parent,
        label="unet-none-basic",
        config_label="unet-none-basic",
        trial_id="t0",
        params={"arch": "unet"},
    )
    trial.finish("TrainingDiverged: loss became NaN")
    uri = ["--tracking-uri", sweep.uri, "--out", str(tmp_path / "x")]
    cases = [
        (["--experiment", "nope"], "experiment 'nope' not found"),
        (["--experiment", "broken"], "has no finished trial (1 FAILED)"),
        (["--experiment", EXPERIMENT, "--constraints", "size_mb<0.0001"], "within the constraints"),
        (["--experiment", EXPERIMENT, "--budget", "fast"], "cannot read 'fast'"),
        (["--experiment", EXPERIMENT, "--metric", "nope"], "--metric 'nope'"),
        (["--run-id", parent], "not a trial run"),
        (["--experiment", EXPERIMENT, "--format", "tflite"], "--format tflite"),
        ([], "pass --experiment NAME"),
    ]
    for args, message in cases:
        code = run_cli(export_main, [*args, *uri])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err, (args, err)
        assert "Traceback" not in err
    bad_uri = ["--experiment", EXPERIMENT, "--tracking-uri", "foo://bar", "--out", str(tmp_path)]
    assert run_cli(export_main, bad_uri) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: tracking URI 'foo://bar': MLflow has no store") and "\n" not in err
    )
    assert not (tmp_path / "x").exists()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "thesis.tex").write_text("mine")
    code = run_cli(export_main, ["--experiment", EXPERIMENT, "--format", "torchscript", *uri])
    assert code == 2 and "not an earlier export of segtune" in capsys.readouterr().err
    assert (tmp_path / "x" / "thesis.tex").read_text() == "mine"


def test_preprocess_equals_the_eval_transform(sweep: Sweep) -> None:
    from segtune.data.transforms import eval_transform

    image = read_image(next((sweep.data / "test" / "image").iterdir()))
    preprocess = Preprocess(IMAGENET_MEAN, IMAGENET_STD)
    ours = preprocess.tensor(image, preprocess.geometry())[0]
    theirs = eval_transform("pad", 32)(image=image)["image"]
    assert ours.shape == theirs.shape == (3, 96, 128)
    assert torch.allclose(ours, theirs, atol=1e-5)


def export_to(sweep: Sweep, exported: ExportResult, out: Path, *extra: str) -> int:
    """The CLI on the fixture's best trial, TorchScript only (the quickest export)."""
    run_id = exported.card["source"]["run_id"]
    argv = ["--run-id", run_id, "--tracking-uri", sweep.uri, "--out", str(out)]
    return run_cli(export_main, [*argv, "--format", "torchscript", *extra])


def holders(folder: Path) -> list[str]:
    """What exports left beside their --out (their staging folders)."""
    return [p.name for p in folder.iterdir() if ".segtune-export-" in p.name]


def test_export_never_deletes_a_users_files(
    sweep: Sweep, exported: ExportResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 23: a downloads folder with a SHA256SUMS of its own was replaced whole."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    iso = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (downloads / "debian.iso").write_bytes(iso)
    (downloads / "thesis.tex").write_text("\\documentclass{article}\n")
    (downloads / "SHA256SUMS").write_text(f"{hashlib.sha256(iso).hexdigest()}  debian.iso\n")
    users = snapshot(downloads)

    assert export_to(sweep, exported, downloads) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --out {downloads}: not an earlier export of segtune (it holds SHA256SUMS, "
        "debian.iso, thesis.tex); choose another --out, or pass --force to write the export "
        "beside those files (they are kept)"
    )
    assert export_to(sweep, exported, downloads, "--force") == 2  # their SHA256SUMS is theirs
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {downloads}: SHA256SUMS there is not from a segtune")
    assert "even --force never overwrites a file segtune did not write" in err
    assert snapshot(downloads) == users

    (downloads / "SHA256SUMS").unlink()  # now --force has a name free for each export file
    users = snapshot(downloads)
    for _ in range(2):  # the second time, over the first export: its files replaced
        assert export_to(sweep, exported, downloads, "--force") == 0
        after = snapshot(downloads)
        assert {name: after[name] for name in users} == users
        assert set(after) - set(users) == FILES - {"model.onnx"}
        assert export_files(downloads) == FILES - {"model.onnx"}
    assert holders(tmp_path) == []

    folder = tmp_path / "old-export-and-notes"  # an export with ONNX, and the user's notes
    shutil.copytree(exported.out, folder)
    (folder / "notes.txt").write_text("mine")
    assert export_to(sweep, exported, folder) == 2
    assert "(it holds notes.txt)" in capsys.readouterr().err
    assert export_to(sweep, exported, folder, "--force") == 0
    assert {p.name for p in folder.iterdir()} == FILES - {"model.onnx"} | {"notes.txt"}
    assert (folder / "notes.txt").read_text() == "mine"


def test_an_earlier_export_is_replaced_cleanly(
    sweep: Sweep, exported: ExportResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    previous = tmp_path / "previous"
    shutil.copytree(exported.out, previous)
    assert export_files(previous) == FILES
    assert export_to(sweep, exported, previous) == 0  # torchscript only: model.onnx goes
    assert {p.name for p in previous.iterdir()} == FILES - {"model.onnx"}
    assert export_files(previous) == FILES - {"model.onnx"}
    assert holders(tmp_path) == []

    link = tmp_path / "link"  # a symlink to an export: the export is written where it leads
    link.symlink_to(previous)
    assert export_to(sweep, exported, link) == 0
    assert link.is_symlink() and export_files(previous) == FILES - {"model.onnx"}

    edited = previous / "README.md"  # an export a user changed is no longer ours alone
    edited.write_text(edited.read_text() + "my notes\n")
    before = snapshot(previous)
    assert export_to(sweep, exported, previous) == 2
    assert "not an earlier export of segtune (it holds README.md, SHA256SUMS, best.pt and 2 " in (
        capsys.readouterr().err
    )
    assert snapshot(previous) == before


def test_an_interrupted_export_leaves_the_old_one_intact(
    sweep: Sweep, exported: ExportResult, tmp_path: Path
) -> None:
    """A real fault in the middle of writing: a file size limit (as a full disk) that best.pt
    fits under and model.pt does not. torch aborts the process inside torch.jit.save, so
    nothing of the export's own cleanup runs: only the order of its writes protects the old
    export. The next export removes what the killed one left."""
    previous = tmp_path / "previous"
    shutil.copytree(exported.out, previous)
    before = snapshot(previous)
    checkpoint, script = ((previous / n).stat().st_size for n in ("best.pt", "model.pt"))
    assert script > checkpoint + 16_384, (checkpoint, script)  # room for a limit between them
    limit = (checkpoint + script) // 2

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    run_id = exported.card["source"]["run_id"]
    argv = [sys.executable, "-m", "segtune.export", "--run-id", run_id, "--tracking-uri"]
    argv += [sweep.uri, "--out", str(previous), "--format", "torchscript"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        argv, env=env, preexec_fn=limited, capture_output=True, text=True, timeout=600
    )
    # killed in torch.jit.save (torch aborts on the failed write), after the download: the
    # staging was under way
    assert done.returncode == -signal.SIGABRT, done.stderr[-2000:]
    assert "exporting unet" in done.stderr or "exporting deeplab" in done.stderr, done.stderr
    assert snapshot(previous) == before and export_files(previous) == FILES
    left = holders(tmp_path)
    assert len(left) == 1  # nothing of the export's own cleanup ran
    assert export_to(sweep, exported, previous) == 0
    assert export_files(previous) == FILES - {"model.onnx"}
    assert holders(tmp_path) == [], left


def test_predict_counts_the_files_it_wrote(
    exported: ExportResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    image(inputs / "a.jpg")
    image(inputs / "b.png", seed=1)
    (inputs / "c.png").write_text("a text file named .png")  # unreadable: skipped
    out = tmp_path / "out"
    for _ in range(2):  # the second time over the first one's masks: replaced
        assert predict_main([str(exported.out), str(inputs), "--out", str(out), "--overlay"]) == 0
        printed = capsys.readouterr().out
        assert f"wrote 2 mask(s) and 2 overlay(s) to {out} " in printed
        assert "skipped 1 unreadable" in printed
        names = sorted(p.name for p in out.iterdir())
        assert names == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]

    # a full disk (a file size limit that a mask fits under and an overlay does not): one line
    # that counts what was written, each file whole
    shutil.rmtree(out)
    limit = 1024  # a class-id mask of 32x24 fits; an overlay of a noise image (2 KB) does not

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    argv = [sys.executable, "-m", "segtune.predict", str(exported.out), str(inputs)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [*argv, "--out", str(out), "--overlay"],
        env=env,
        preexec_fn=limited,
        capture_output=True,
        text=True,
        timeout=600,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith(f"error: --out {out}: cannot write ("), last
    assert last.endswith("1 mask(s) and 0 overlay(s) written before, each whole"), last
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # no partial file left
