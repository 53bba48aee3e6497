"""The training loop: exact resume, divergence, schedules, AMP resolution, the train CLI."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segtune.cli import run_cli
from segtune.config.names import DATA_WAIT_METRICS
from segtune.config.trial import DataConfig, TrialConfig, trial_config
from segtune.data.pipeline import build_data
from segtune.errors import ConfigError, TrainingDiverged
from segtune.models import build_model
from segtune.models.checkpoint import REQUIRED_KEYS, load_checkpoint
from segtune.training.engine import (
    EpochEnd,
    amp_dtype,
    build_optimizer,
    build_scheduler,
    fit,
    seed_everything,
)
from segtune.training.losses import build_loss

TINY_UNET = {
    "arch": "unet",
    "backbone": "none",
    "unet_min_channels": 4,
    "unet_max_channels": 16,
    "unet_depth": 2,
    "image_size": 64,
    "batch_size": 4,
    "augment": "basic",
    "deterministic": True,
    "lr": 3e-3,
}


def _fit(cfg: TrialConfig, root: Path, **kwargs: object):
    data = build_data(DataConfig(root=str(root)), cfg, progress=False)
    seed_everything(cfg.seed, cfg.deterministic)  # the initial weights depend on the seed
    return fit(
        build_model(cfg), data.train_loader, data.val_loader, cfg, build_loss(cfg.loss), **kwargs
    )


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(synthetic_root: Path) -> None:
    cfg = trial_config({**TINY_UNET, "epochs": 4, "scheduler": "cosine", "warmup_epochs": 0.5})
    straight = _fit(cfg, synthetic_root)

    saved = {}

    def crash_after_two(event: EpochEnd) -> None:
        if event.epoch == 1:
            buffer = io.BytesIO()
            torch.save(event.build_state(), buffer)  # as a checkpoint file would hold it
            saved["state"] = buffer.getvalue()
            raise Interrupt

    with pytest.raises(Interrupt):
        _fit(cfg, synthetic_root, callbacks=[crash_after_two])
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    resumed = _fit(cfg, synthetic_root, resume=state)

    assert len(resumed.history) == 4
    for a, b in zip(straight.history, resumed.history, strict=True):
        for key in a:
            if key not in ("epoch_time_s", "train_img_s", *DATA_WAIT_METRICS):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7, nan_ok=True), key
    assert straight.best_epoch == resumed.best_epoch
    for name, tensor in straight.best_state_dict.items():
        assert torch.allclose(tensor.float(), resumed.best_state_dict[name].float(), atol=1e-6), (
            name
        )


def test_a_best_epochs_state_holds_its_weights_once(synthetic_root: Path) -> None:
    """Every epoch's state goes to a checkpoint: at a best epoch the best weights are the
    model's own tensors, which torch.save writes once (and torch.load shares again)."""
    cfg = trial_config({**TINY_UNET, "epochs": 2, "augment": "none"})
    seen: list[tuple[bool, bool]] = []

    def save(event: EpochEnd) -> None:
        buffer = io.BytesIO()
        torch.save(event.build_state(), buffer)
        state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        shared = all(
            state["best_model"][k].data_ptr() == v.data_ptr() for k, v in state["model"].items()
        )
        seen.append((event.is_best, shared))

    _fit(cfg, synthetic_root, callbacks=[save])
    assert seen[0] == (True, True) and all(best == shared for best, shared in seen), seen


def test_training_learns_and_reports_every_key(synthetic_root: Path) -> None:
    cfg = trial_config({**TINY_UNET, "epochs": 3, "augment": "none"})
    seen: list[EpochEnd] = []
    result = _fit(cfg, synthetic_root, callbacks=[seen.append])
    assert [e.epoch for e in seen] == [0, 1, 2]
    metrics = result.history[-1]
    for key in ("train_loss", "val_loss", "val_miou", "val_acc", "val_class_acc", "lr"):
        assert key in metrics
    assert all(f"val_iou_{c}" in metrics for c in ("background", "vehicle", "grass"))
    assert 0.0 <= metrics["val_miou"] <= 1.0 and metrics["epoch_time_s"] > 0
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_metric == max(h["val_miou"] for h in result.history)
    assert seen[result.best_epoch].is_best


def test_divergence_names_epoch_step_and_lr(synthetic_root: Path) -> None:
    cfg = trial_config({**TINY_UNET, "epochs": 2, "lr": 1e6, "scheduler": "none"})
    with pytest.raises(
        TrainingDiverged, match=r"loss became (nan|inf) at epoch 0, step \d+, lr 1e\+06"
    ):
        _fit(cfg, synthetic_root)


def test_amp_resolution() -> None:
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        amp_dtype("fp16", cpu)


@pytest.mark.parametrize("name", ["poly", "cosine", "none", "onecycle"])
def test_schedules(name: str) -> None:
    cfg = trial_config({"lr": 0.1, "epochs": 2, "scheduler": name, "warmup_epochs": 0.5})
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(0.1, rel=0.05)
    if name in ("poly", "cosine"):
        assert lrs[0] == pytest.approx(0.1 / 5)  # warm-up: 5 steps, linear
        assert lrs[4] == pytest.approx(0.1)
        assert lrs[-1] < 0.1 * 0.15
    if name == "none":
        assert lrs[5:] == [pytest.approx(0.1)] * 15


@pytest.mark.slow  # over 10 s on 2 cores: make test, not make check
def test_train_cli_writes_a_safe_checkpoint(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "segtune.train", "--data", str(synthetic_root), "--out", str(out)]
    cmd += ["--arch", "unet", "--backbone", "none", "--epochs", "2", "--image-size", "64"]
    cmd += [
        "--set",
        "unet_min_channels=4",
        "--set",
        "unet_max_channels=16",
        "--set",
        "unet_depth=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("val_miou") >= 3  # two epoch lines and the summary
    ckpt = load_checkpoint(out / "best.pt")
    assert set(REQUIRED_KEYS) <= set(ckpt)
    assert ckpt["class_names"][5] == "vehicle" and ckpt["palette"][1] == [0, 0, 255]
    assert 0.0 <= ckpt["metrics"]["best_val_miou"] <= 1.0
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["model"])  # the state dict matches the recorded configuration

    resumed = subprocess.run(
        [*cmd[:-14], *cmd[-14:], "--resume", "--set", "epochs=3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch   3/3" in resumed.stdout and "epoch   1/3" not in resumed.stdout


def test_train_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from segtune.train import main

    argv = ["--data", str(tmp_path / "none"), "--out", str(tmp_path)]
    assert run_cli(main, [*argv, "--arch", "deeplabv3", "--backbone", "none"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "backbone" in err
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_the_evaluation_writes_every_pick_and_predicts_each_image_once(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """An image picked for several reasons (best overall and best for a class) is one forward
    pass: the best weights' evaluation is on each trial's path to its end."""
    import pandas as pd

    from segtune.training.evaluation import evaluate_best, pick_examples

    cfg = trial_config(TINY_UNET)
    data = build_data(DataConfig(root=str(synthetic_root)), cfg, progress=False)
    model = build_model(cfg).eval()
    images: list[int] = []
    model.register_forward_hook(lambda _m, args, _out: images.append(args[0].shape[0]))
    scores = evaluate_best(model, data.val, tmp_path, torch.device("cpu"), None, cfg.batch_size)
    table = pd.read_csv(tmp_path / "per_image.csv", dtype={"id": str})
    picks = pick_examples(table)
    assert len(table) == len(data.val) and 0.0 <= scores["boundary_miou"] <= 1.0
    assert {p.stem for p in (tmp_path / "examples").glob("*.png")} == set(picks)
    assert len(set(picks.values())) < len(picks)  # this split has images picked twice
    assert sum(images) == len(data.val) + len(set(picks.values()))
