"""`build_model(cfg)`: a trial's model keys to a network, and the list of every valid variant.

Rules (each violation is a `ConfigError` listing the valid values):
- `arch` is one of ARCHS; `backbone` is `none` or a registered encoder. `backbone: none` is
  the study's classic UNet and only exists for `arch: unet`.
- `aspp` only applies to the DeepLabs; UNet ignores it (`TrialConfig.label()` omits it).
- `output_stride` (8, 16, 32) only applies to the DeepLabs; UNet always uses stride 32.
- `unet_min_channels`, `unet_max_channels`, `unet_depth` only apply to the classic UNet.
- `dropout`: after each skip concatenation in the U-Nets, at the end of the ASPP (or of
  what replaces it) in the DeepLabs.
- With `aspp`, a training batch needs at least 2 images (the ASPP image-pooling branch
  normalises one value per image); the model raises a `ModelError` otherwise.
- `pretrained`: `none`; `imagenet` (torchvision's file, downloaded into the torch hub cache
  when missing, see `segtune.models.weights`; not for `backbone: none`); or a file, or its
  `https://...#sha256=HEX` URL (downloaded the same way): a segtune checkpoint (a dict with
  key `model`) loads the whole model, a raw state dict loads the encoder (torchvision layout,
  classifier keys dropped) or, with `backbone: none`, the whole model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, get_args

import torch
from torch import nn

from segtune.classes import NUM_CLASSES
from segtune.config.trial import Arch, TrialConfig, trial_config
from segtune.errors import ConfigError
from segtune.models.checkpoint import load_dict
from segtune.models.deeplab import DeepLabV3, DeepLabV3Plus
from segtune.models.encoders import (
    PRETRAINED,
    build_encoder,
    encoder_names,
    load_state_checked,
    pretrained_file,
)
from segtune.models.unet import EncoderUNet, UNet

log = logging.getLogger(__name__)

ARCHS: tuple[str, ...] = get_args(Arch)


def backbone_names(arch: str) -> list[str]:
    """The valid `backbone` values for an architecture."""
    return ["none", *encoder_names()] if arch == "unet" else encoder_names()


def model_variants() -> list[dict[str, Any]]:
    """Every valid (arch, backbone, aspp) combination, for cost tables and smoke tests."""
    variants: list[dict[str, Any]] = []
    for arch in ARCHS:
        for backbone in backbone_names(arch):
            for aspp in (False,) if arch == "unet" else (True, False):
                variants.append({"arch": arch, "backbone": backbone, "aspp": aspp})
    return variants


def check_model_config(cfg: TrialConfig) -> None:
    """Reject combinations that cannot be built, before anything is allocated."""
    valid = backbone_names(cfg.arch)
    if cfg.backbone not in valid:
        if cfg.backbone == "none":
            reason = f"arch {cfg.arch} needs a backbone"
        else:
            reason = f"unknown {cfg.backbone!r} for arch {cfg.arch}"
        raise ConfigError(f"backbone: {reason}; valid: {', '.join(valid)}")
    if cfg.pretrained == "imagenet" and cfg.backbone == "none":
        raise ConfigError(
            "pretrained: imagenet needs a backbone; backbone: none (the classic UNet) has no "
            "ImageNet weights: use pretrained: none, a file, or a backbone"
        )
    if cfg.backbone == "none" and cfg.unet_min_channels > cfg.unet_max_channels:
        raise ConfigError(
            f"unet_min_channels ({cfg.unet_min_channels}) exceeds unet_max_channels "
            f"({cfg.unet_max_channels})"
        )
    if cfg.backbone == "none" and cfg.image_size < 2**cfg.unet_depth:
        raise ConfigError(
            f"unet_depth {cfg.unet_depth} halves images {cfg.unet_depth} times: image_size must "
            f"be at least {2**cfg.unet_depth}, got {cfg.image_size}"
        )
    if cfg.arch != "unet" and min(cfg.aspp_rates) < 1:
        raise ConfigError(f"aspp_rates: dilation rates must be >= 1, got {list(cfg.aspp_rates)}")


def _pretrained_states(
    cfg: TrialConfig,
) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """(whole-model state, encoder state) from a `pretrained` file; neither otherwise."""
    if cfg.pretrained in ("none", "imagenet"):
        return None, None
    state = load_dict(pretrained_file(cfg.pretrained, cfg.backbone), PRETRAINED)
    if isinstance(state.get("model"), Mapping):
        return state["model"], None
    return (state, None) if cfg.backbone == "none" else (None, state)


# the trial keys `build_model` reads besides `pretrained`: configurations equal on these build
# the same network (the same structure; weights aside), so they share one measured cost
MODEL_KEYS = (
    "arch",
    "backbone",
    "aspp",
    "aspp_rates",
    "output_stride",
    "unet_min_channels",
    "unet_max_channels",
    "unet_depth",
    "dropout",
)


def build_model(cfg: TrialConfig | Mapping[str, Any]) -> nn.Module:
    """The network of a trial: `(N, 3, H, W)` images to `(N, NUM_CLASSES, H, W)` logits."""
    cfg = trial_config(cfg)
    check_model_config(cfg)
    model_state, encoder_state = _pretrained_states(cfg)

    model: nn.Module
    if cfg.backbone == "none":
        model = UNet(
            NUM_CLASSES,
            min_channels=cfg.unet_min_channels,
            max_channels=cfg.unet_max_channels,
            depth=cfg.unet_depth,
            dropout=cfg.dropout,
        )
    else:
        output_stride = 32 if cfg.arch == "unet" else cfg.output_stride
        encoder = build_encoder(
            cfg.backbone, "imagenet" if cfg.pretrained == "imagenet" else "none", output_stride
        )
        if encoder_state is not None:
            encoder.load_backbone_state_dict(encoder_state, cfg.pretrained)
        if cfg.arch == "unet":
            model = EncoderUNet(encoder, NUM_CLASSES, dropout=cfg.dropout)
        else:
            head = DeepLabV3 if cfg.arch == "deeplabv3" else DeepLabV3Plus
            model = head(encoder, NUM_CLASSES, cfg.aspp, cfg.aspp_rates, cfg.dropout)
    if model_state is not None:
        load_state_checked(model, model_state, cfg.pretrained, f"model {cfg.label()}")
    log.debug(
        "built %s: %.2f M parameters",
        cfg.label(),
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model


def example_input(
    hw: Sequence[int],
    batch: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """A reproducible `batch x 3 x H x W` input shaped like normalised images (standard normal
    noise): what tracing, checking and timing a model run on."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *hw, generator=generator).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
