"""Where a model runs and at what precision: one answer for training, evaluation, cost and predict."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, get_args

import torch

from segtune.config.trial import Amp
from segtune.errors import ConfigError

AMP_MODES: tuple[str, ...] = get_args(Amp)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): the GPU when torch sees one, else the CPU. Asking for CUDA where torch
    sees none is a ConfigError, not a crash deep inside the first forward pass."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: torch sees no CUDA device (torch.cuda.is_available() is False); "
            "use --device cpu or auto"
        )
    return device


def check_amp(amp: str) -> str:
    if amp not in AMP_MODES:
        raise ConfigError(f"invalid amp {amp!r}: expected one of {', '.join(AMP_MODES)}")
    return amp


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an `amp` mode on `device`; None means float32.

    `auto`: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on the CPU (CPU
    autocast is slower than float32 on most CPUs).
    """
    if check_amp(amp) == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp: fp16 needs a CUDA device; use amp: bf16 or off on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """`torch.autocast` at `dtype`, or nothing for float32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
