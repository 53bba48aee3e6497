"""`python -m segtune.train`: one trial without Ray or MLflow, for debugging a configuration.

Prints each epoch's metrics, writes `best.pt` (the checkpoint format of docs/design.md) and
`last.pt` (the full training state after the last epoch, which `--resume` continues).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from segtune.cli import check_out_folder, command_parser, run_cli, setup_logging
from segtune.config.trial import Arch, Augment, DataConfig, apply_overrides, trial_config
from segtune.errors import ConfigError
from segtune.models import check_model_config
from segtune.models.checkpoint import atomic_save, best_checkpoint, load_dict
from segtune.models.device import resolve_device
from segtune.training.engine import EpochEnd, fit
from segtune.training.prepare import prepare

log = logging.getLogger("segtune.train")


def _parser() -> argparse.ArgumentParser:
    p = command_parser("python -m segtune.train", __doc__)
    p.add_argument(
        "--data", required=True, help="dataset root (ROOT/{train,val,test}/{image,mask})"
    )
    p.add_argument("--out", required=True, help="folder for best.pt, last.pt, history.json")
    p.add_argument("--arch", choices=get_args(Arch))
    p.add_argument("--backbone")
    p.add_argument("--aspp", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--augment", choices=get_args(Augment))
    p.add_argument("--pretrained", help="none | imagenet | a path | URL#sha256=HEX")
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
    device = resolve_device(args.device)  # a device that cannot be, before any work
    out = Path(args.out)
    check_out_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    resume = None
    if args.resume:
        resume = load_dict(out / "last.pt", "--resume")

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
        atomic_save(event.build_state(), out / "last.pt")

    result = fit(
        model,
        data.train_loader,
        data.val_loader,
        cfg,
        loss_fn,
        device=device,
        callbacks=[report],
        resume=resume,
    )
    best = result.history[result.best_epoch]
    metrics = {**best, **result.summary()}
    atomic_save(best_checkpoint(result.best_state_dict, cfg, metrics), out / "best.pt")
    (out / "history.json").write_text(json.dumps(result.history, indent=1))
    print(
        f"best epoch {result.best_epoch + 1}: val_miou {best['val_miou']:.4f} -> {out / 'best.pt'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
