"""The training engine's overhead: one `fit()` epoch against a bare PyTorch loop on the same
model and tensors (`python -m segtune.bench engine`)."""

from __future__ import annotations

import statistics
import time

import torch

from segtune.config.trial import trial_config
from segtune.models.device import resolve_device, sync


class _TensorDataset(torch.utils.data.Dataset):
    """Pre-built tensors in the dataset's `{"image", "mask", "id"}` form: no decoding, no augmentation."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, object]:
        index = key[0] if isinstance(key, tuple) else key
        return {"image": self.images[index], "mask": self.masks[index], "id": str(index)}


def engine_overhead(
    arch: str, backbone: str, size: int, batch: int, images: int, repeats: int, device: str
) -> dict[str, float]:
    """Images/s of one `fit()` epoch against a bare PyTorch loop on the same model and tensors.

    Both train the same architecture from the same initial weights on the same pre-built
    tensors, in alternation, `repeats` times; the medians and their ratio are returned.
    """
    import torch.nn.functional as F

    from segtune.classes import IGNORE_INDEX, NUM_CLASSES
    from segtune.data.loader import make_loader
    from segtune.models import build_model
    from segtune.training.engine import fit
    from segtune.training.losses import build_loss

    dev = resolve_device(device)
    cfg = trial_config(
        {
            "arch": arch,
            "backbone": backbone,
            "batch_size": batch,
            "epochs": 1,
            "scheduler": "none",
            "image_size": size,
            "amp": "off",
        }
    )
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(images, 3, size, size, generator=generator)
    ys = torch.randint(0, NUM_CLASSES, (images, size, size), generator=generator)
    dataset = _TensorDataset(xs, ys)
    train = make_loader(dataset, batch, shuffle=True, drop_last=True)
    val = make_loader(_TensorDataset(xs[:batch], ys[:batch]), batch, shuffle=False)
    torch.manual_seed(0)
    initial = build_model(cfg).state_dict()
    # host tensors, moved per step as fit() must; pinned as its loader pins them on CUDA
    batches = [(xs[i : i + batch], ys[i : i + batch]) for i in range(0, images - batch + 1, batch)]
    if dev.type == "cuda":
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]

    def bare() -> float:
        model = build_model(cfg).to(dev)
        model.load_state_dict(initial)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sync(dev)
        started = time.perf_counter()
        for x_host, y_host in batches:
            x, y = x_host.to(dev, non_blocking=True), y_host.to(dev, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)
            loss.backward()
            optimizer.step()
        sync(dev)
        return len(batches) * batch / (time.perf_counter() - started)

    def engine() -> float:
        model = build_model(cfg)
        model.load_state_dict(initial)
        result = fit(model, train, val, cfg, build_loss("ce"), device=dev)
        return result.history[0]["train_img_s"]

    bare_runs, engine_runs = [], []
    bare()  # warm-up: allocator, kernels, thread pools
    for _ in range(repeats):
        bare_runs.append(bare())
        engine_runs.append(engine())
    return {
        "bare_img_s": statistics.median(bare_runs),
        "engine_img_s": statistics.median(engine_runs),
        "ratio": statistics.median(engine_runs) / statistics.median(bare_runs),
    }
