"""Segmentation models: an encoder registry with one feature contract, and the decoders
(classic UNet, U-Net over an encoder, DeepLabV3, DeepLabV3+) behind `build_model(cfg)`."""

from __future__ import annotations

from segtune.models.builder import (
    ARCHS,
    MODEL_KEYS,
    backbone_names,
    build_model,
    check_model_config,
    example_input,
    model_variants,
)
from segtune.models.deeplab import DeepLabV3, DeepLabV3Plus
from segtune.models.encoders import (
    Encoder,
    build_encoder,
    encoder_names,
    pretrained_file,
    pretrained_weights_file,
)
from segtune.models.unet import EncoderUNet, UNet

__all__ = [
    "ARCHS",
    "MODEL_KEYS",
    "DeepLabV3",
    "DeepLabV3Plus",
    "Encoder",
    "EncoderUNet",
    "UNet",
    "backbone_names",
    "build_encoder",
    "build_model",
    "check_model_config",
    "encoder_names",
    "example_input",
    "model_variants",
    "pretrained_file",
    "pretrained_weights_file",
]
