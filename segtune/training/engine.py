"""`fit()`: the training loop of one trial, top to bottom.

It knows nothing of Ray or MLflow: after each epoch it hands its metrics and a way to build
its full state to callbacks, which is where checkpoints, reports and logging plug in. A state
saved after epoch k and passed back as `resume` continues exactly where it stopped: the
loaders' order and augmentations depend only on (seed, epoch), and the RNG state travels.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from segtune.classes import CLASS_NAMES
from segtune.config.names import DATA_WAIT_MEAN, OBJECTIVE
from segtune.config.trial import TrialConfig
from segtune.data.loader import set_epoch
from segtune.errors import TrainingDiverged
from segtune.models.device import amp_dtype, autocast, resolve_device, sync
from segtune.training.metrics import ConfusionMatrix

log = logging.getLogger(__name__)

State = dict[str, Any]


@dataclass
class EpochEnd:
    """What callbacks receive after each epoch; `build_state()` builds the checkpointable state."""

    epoch: int
    metrics: dict[str, float]
    is_best: bool
    summary: dict[str, float]  # `training_summary` of the epochs so far
    build_state: Callable[[], State]


class Callback(Protocol):
    def __call__(self, event: EpochEnd) -> None: ...


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_metric: float
    best_epoch: int
    best_state_dict: dict[str, torch.Tensor]
    train_time_s: float  # training and validation of the epochs run here, wall clock

    def summary(self) -> dict[str, float]:
        return training_summary(self.history, self.best_epoch)


def training_summary(history: Sequence[dict[str, float]], best_epoch: int) -> dict[str, float]:
    """The final training metrics of the MLflow contract: the best epoch's mIoU, the training
    time of every epoch (validation included), the median training throughput, and the mean
    of the epochs' data wait fractions, each epoch alike (over the epochs that measured it: a
    state saved before segtune did has none; NaN, which logging skips, if no epoch did)."""
    waits = [h["data_wait_frac"] for h in history if "data_wait_frac" in h]
    return {
        OBJECTIVE: history[best_epoch]["val_miou"],
        "best_epoch": best_epoch,
        "train_time_min": sum(h["epoch_time_s"] for h in history) / 60.0,
        "train_img_s": statistics.median(h["train_img_s"] for h in history),
        DATA_WAIT_MEAN: statistics.fmean(waits) if waits else math.nan,
    }


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def build_optimizer(model: nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrialConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule: linear warm-up, then poly (power 0.9), cosine or constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total,
            pct_start=warmup / total if warmup else 0.3,
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.scheduler == "poly":
            return (1.0 - progress) ** 0.9
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (channels_last on a GPU, where convolutions prefer it) and masks on `device`."""
    images = batch["image"].to(device, non_blocking=True)
    masks = batch["mask"].to(device, non_blocking=True).long()
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, masks


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    loss_fn: nn.Module | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
    on_batch: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
    matrix: ConfusionMatrix | None = None,
) -> dict[str, float]:
    """Loss (mean over images) and confusion-matrix metrics over a whole split.

    `on_batch(batch, predictions)` sees every batch, e.g. for per-image rows; pass `matrix`
    to keep the split's confusion matrix.
    """
    model.eval()
    matrix = matrix if matrix is not None else ConfusionMatrix(device=device)
    loss_sum, count = torch.zeros((), device=device), 0
    for batch in loader:
        images, masks = _to_device(batch, device)
        with autocast(device, dtype):
            logits = model(images)
        if loss_fn is not None:
            loss_sum += loss_fn(logits.float(), masks) * images.shape[0]
        count += images.shape[0]
        predictions = logits.argmax(1)
        matrix.update(predictions, masks)
        if on_batch is not None:
            on_batch(batch, predictions)
    scores = matrix.compute()
    metrics = {
        "miou": scores["miou"],
        "acc": scores["acc"],
        "class_acc": scores["class_acc"],
        **{f"iou_{name}": scores[f"iou_{name}"] for name in CLASS_NAMES},
    }
    if loss_fn is not None:
        metrics = {"loss": float(loss_sum) / max(1, count), **metrics}
    return metrics


def _check_finite(
    losses: list[torch.Tensor], epoch: int, last_step: int, optimizer: torch.optim.Optimizer
) -> None:
    """Raise `TrainingDiverged` naming the first non-finite loss of the window ending at
    `last_step`."""
    if not losses:
        return
    values = torch.stack(losses)
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    first = int((~finite).nonzero()[0])
    step = last_step - len(losses) + 1 + first
    raise TrainingDiverged(
        f"loss became {values[first].item()} at epoch {epoch}, step {step}, "
        f"lr {optimizer.param_groups[0]['lr']:.3g}; lower train.lr, set train.grad_clip, "
        "or try amp: off"
    )


class _WaitClock:
    """The batches of a loader, counting the host seconds spent in its `iter()` and `next()`:
    the time the training step waited for data. Worker start-up counts, as the step waits on
    it too. On a GPU the step is queued, not finished, when the host asks for the next batch,
    so no sync is needed: a GPU-bound epoch blocks the host elsewhere and its loader keeps up."""

    def __init__(self, loader: Iterable[dict[str, Any]]) -> None:
        self.loader, self.seconds = loader, 0.0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        asked = time.perf_counter()
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                self.seconds += time.perf_counter() - asked
                return
            self.seconds += time.perf_counter() - asked
            yield batch
            asked = time.perf_counter()


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _improved(value: float, best: float, mode: str) -> bool:
    if math.isnan(value):
        return False
    return math.isnan(best) or (value > best if mode == "max" else value < best)


def fit(
    model: nn.Module,
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any],
    cfg: TrialConfig,
    loss_fn: nn.Module,
    *,
    device: str | torch.device | None = None,
    callbacks: Sequence[Callback] = (),
    resume: State | None = None,
) -> FitResult:
    """Train `model` for `cfg.epochs` epochs, validating after each; keep the best weights.

    The best epoch is chosen by `cfg.select_metric` (maximised, or minimised for a loss).
    Raises `TrainingDiverged` as soon as a loss is not finite.
    """
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(device)
    dtype = amp_dtype(cfg.amp, device)
    model.to(device)
    loss_fn.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    mode = "min" if cfg.select_metric.endswith("loss") else "max"
    # On a GPU, reading a loss stalls the pipeline: check a window of steps at once. A bad
    # step is still named exactly; at most `check_every - 1` more steps ran after it.
    check_every = 16 if device.type == "cuda" else 1

    start_epoch, history = 0, []
    best_metric, best_epoch = math.nan, -1
    best_state = _cpu_copy(model.state_dict())
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch, history = resume["epoch"], list(resume["history"])
        best_metric, best_epoch = resume["best_metric"], resume["best_epoch"]
        best_state = resume["best_model"]
        torch.set_rng_state(resume["rng"]["torch"])
        if torch.cuda.is_available() and resume["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
        log.info("resuming at epoch %d (best %s %.4f)", start_epoch, cfg.select_metric, best_metric)

    wall = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        model.train()
        set_epoch(train_loader, epoch)
        loss_sum, seen = torch.zeros((), device=device), 0
        losses: list[torch.Tensor] = []  # this window's losses, checked without a sync per step
        step = -1
        clock = _WaitClock(train_loader)
        for step, batch in enumerate(clock):
            images, masks = _to_device(batch, device)
            with autocast(device, dtype):
                logits = model(images)
            loss = loss_fn(logits.float(), masks)
            losses.append(loss.detach())
            if len(losses) == check_every:
                _check_finite(losses, epoch, step, optimizer)
                losses.clear()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach() * images.shape[0]
            seen += images.shape[0]
        _check_finite(losses, epoch, step, optimizer)
        sync(device)
        train_seconds = time.perf_counter() - started
        val = evaluate(model, val_loader, loss_fn, device, dtype)
        epoch_seconds = time.perf_counter() - started
        wall += epoch_seconds

        metrics = {
            "train_loss": float(loss_sum) / max(1, seen),
            **{f"val_{key}": value for key, value in val.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_seconds,
            "train_img_s": seen / train_seconds if train_seconds > 0 else math.nan,
            "data_wait_s": clock.seconds,
            "data_wait_frac": clock.seconds / train_seconds if train_seconds > 0 else math.nan,
        }
        history.append(metrics)
        is_best = _improved(metrics[cfg.select_metric], best_metric, mode)
        if is_best:
            best_metric, best_epoch = metrics[cfg.select_metric], epoch
            best_state = _cpu_copy(model.state_dict())
        log.debug(
            "epoch %d/%d train_loss %.4f val_loss %.4f val_miou %.4f (%.1fs)%s",
            epoch + 1,
            cfg.epochs,
            metrics["train_loss"],
            metrics["val_loss"],
            metrics["val_miou"],
            epoch_seconds,
            " *" if is_best else "",
        )

        snapshot = {
            "epoch": epoch + 1,
            "history": list(history),
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "best_model": best_state,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

        def build_state(snapshot: State = snapshot, best_now: bool = is_best) -> State:
            weights = model.state_dict()
            return {
                "model": weights,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                **snapshot,
                # the same tensors: torch.save writes the weights of a best epoch once
                **({"best_model": weights} if best_now else {}),
            }

        event = EpochEnd(
            epoch, metrics, is_best, training_summary(history, best_epoch), build_state
        )
        for callback in callbacks:
            callback(event)

    return FitResult(history, best_metric, best_epoch, best_state, wall)
