"""`python -m segtune.train`: one trial without Ray or MLflow, for debugging a configuration.

Prints each epoch's metrics, writes `best.pt` (DESIGN.md format) and `last.pt` (the full
training state after the last epoch, which `--resume` continues).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from segtune.checkpoint import atomic_save, best_checkpoint
from segtune.cli import run_cli, setup_logging
from segtune.config import DataConfig, TrialConfig, apply_overrides, trial_config
from segtune.data.pipeline import DataBundle, build_data
from segtune.engine import EpochEnd, fit, seed_everything
from segtune.errors import ConfigError
from segtune.losses import build_loss, class_weights
from segtune.models import build_model, check_model_config

log = logging.getLogger("segtune.train")


def prepare(
    data_cfg: DataConfig, cfg: TrialConfig, progress: bool = True
) -> tuple[DataBundle, nn.Module, nn.Module]:
    """One trial's inputs: its data, its loss (class weights from the training masks) and its
    model, built after seeding so that the initial weights depend on `cfg.seed` alone."""
    data = build_data(data_cfg, cfg, progress)
    loss_fn = build_loss(
        cfg.loss, class_weights=class_weights(data.class_pixels, cfg.class_weights)
    )
    seed_everything(cfg.seed, cfg.deterministic)
    return data, build_model(cfg), loss_fn


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segtune.train", description=__doc__)
    p.add_argument("--data", required=True, help="dataset root (DESIGN.md layout)")
    p.add_argument("--out", required=True, help="folder for best.pt, last.pt, history.json")
    p.add_argument("--arch", choices=("unet", "deeplabv3", "deeplabv3plus"))
    p.add_argument("--backbone")
    p.add_argument("--aspp", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--augment", choices=("none", "basic", "strong"))
    p.add_argument("--pretrained", help="none | imagenet | path to a state dict")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--image-size", type=int, dest="image_size")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any trial key")
    p.add_argument("--val-split", default="auto", help="auto | val | test | a fraction of train")
    p.add_argument("--no-cache", action="store_true", help="decode images every epoch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    keys = ("arch", "backbone", "aspp", "augment", "pretrained", "epochs", "batch_size", "lr")
    values = {k: getattr(args, k) for k in (*keys, "image_size", "seed")}
    values = {k: v for k, v in values.items() if v is not None}
    values.update(apply_overrides({}, args.set))
    cfg = trial_config(values)
    check_model_config(cfg)  # a configuration error is reported before the data is read
    val_split: str | float = args.val_split
    if val_split not in ("auto", "val", "test"):
        try:
            val_split = float(val_split)
        except ValueError:
            raise ConfigError(
                f"--val-split {val_split!r}: use auto, val, test or a fraction"
            ) from None
    data_cfg = DataConfig(root=args.data, val_split=val_split, cache=not args.no_cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resume = None
    if args.resume:
        resume = torch.load(out / "last.pt", map_location="cpu", weights_only=True)

    data, model, loss_fn = prepare(data_cfg, cfg)
    print(f"{cfg.label()}: {len(data.train)} train, {len(data.val)} val ({data.val_split})")

    def report(event: EpochEnd) -> None:
        m = event.metrics
        print(
            f"epoch {event.epoch + 1:3d}/{cfg.epochs}  train_loss {m['train_loss']:.4f}  "
            f"val_loss {m['val_loss']:.4f}  val_miou {m['val_miou']:.4f}  "
            f"val_acc {m['val_acc']:.4f}  lr {m['lr']:.2e}  {m['epoch_time_s']:.1f}s"
            + ("  *best" if event.is_best else ""),
            flush=True,
        )
        atomic_save(event.state(), out / "last.pt")

    result = fit(
        model,
        data.train_loader,
        data.val_loader,
        cfg,
        loss_fn,
        device=args.device,
        callbacks=[report],
        resume=resume,
    )
    best = result.history[result.best_epoch]
    metrics = {**best, "best_val_miou": best["val_miou"], "best_epoch": result.best_epoch}
    atomic_save(best_checkpoint(result.best_state_dict, cfg, metrics), out / "best.pt")
    (out / "history.json").write_text(json.dumps(result.history, indent=1))
    print(
        f"best epoch {result.best_epoch + 1}: val_miou {best['val_miou']:.4f} -> {out / 'best.pt'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
