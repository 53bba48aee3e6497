"""DeepLabV3 (the study's Tasks 2-3) and DeepLabV3+ (the study's Task 4 proposal) over any encoder.

The ASPP is torchvision's (`torchvision.models.segmentation.deeplabv3`): a 1x1 branch, one
dilated 3x3 branch per rate, an image-pooling branch, a 1x1 projection to 256 channels and
dropout, whose rate is the trial's `dropout` instead of torchvision's fixed 0.5.

The image-pooling branch applies BatchNorm to one pooled value per sample and channel, so in
train mode it needs at least two samples per batch; the models raise a `ModelError` saying
so rather than torch's generic message (eval mode, as in inference, works with any batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead
from torchvision.ops.misc import Conv2dNormActivation

from segtune.errors import ModelError
from segtune.models.encoders import Encoder, resize_to

CHANNELS = 256  # width of ASPP and of the heads, as in the DeepLab papers


def _set_aspp_dropout(aspp: ASPP, dropout: float) -> ASPP:
    aspp.project[-1].p = dropout
    return aspp


def _check_batch(model: nn.Module, x: Tensor) -> None:
    if model.training and x.shape[0] < 2:
        raise ModelError(
            "ASPP's image-pooling BatchNorm needs at least 2 samples per batch in train mode; "
            "use batch_size >= 2 (and drop incomplete last batches), or aspp: false"
        )


class DeepLabV3(nn.Module):
    """Encoder (dilated to its output stride) -> ASPP -> conv3x3-BN-ReLU -> 1x1 -> upsample.

    With ASPP the head is torchvision's `DeepLabHead`; without it the same
    conv3x3-BN-ReLU-(dropout)-1x1 head sits directly on the encoder's deepest map, so the
    two differ only by the ASPP (the study's Task 2 comparison).
    """

    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        aspp: bool = True,
        aspp_rates: Sequence[int] = (12, 24, 36),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.aspp = aspp
        in_channels = encoder.out_channels[-1]
        if aspp:
            self.head: nn.Sequential = DeepLabHead(in_channels, num_classes, tuple(aspp_rates))
            _set_aspp_dropout(self.head[0], dropout)
        else:
            self.head = nn.Sequential(
                Conv2dNormActivation(in_channels, CHANNELS, kernel_size=3),
                nn.Dropout(dropout),
                nn.Conv2d(CHANNELS, num_classes, kernel_size=1),
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.aspp:
            _check_batch(self, x)
        features = self.encoder(x)
        return resize_to(self.head(features[-1]), x.shape[-2:])


class DeepLabV3Plus(nn.Module):
    """DeepLabV3 plus a decoder that restores boundaries from the stride-4 features.

    The context module (ASPP, or with `aspp: false` a 1x1 conv-BN-ReLU projection to 256
    channels followed by the same dropout) is upsampled to the stride-4 map, concatenated
    with that map reduced to 48 channels, refined by two conv3x3-BN-ReLU, classified and
    upsampled to the input size (Chen et al., 2018).
    """

    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        aspp: bool = True,
        aspp_rates: Sequence[int] = (12, 24, 36),
        dropout: float = 0.1,
        low_level_channels: int = 48,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.aspp = aspp
        self.low_level_index = encoder.strides.index(4)
        high, low = encoder.out_channels[-1], encoder.out_channels[self.low_level_index]
        if aspp:
            self.context: nn.Module = _set_aspp_dropout(ASPP(high, tuple(aspp_rates)), dropout)
        else:
            self.context = nn.Sequential(
                Conv2dNormActivation(high, CHANNELS, kernel_size=1), nn.Dropout(dropout)
            )
        self.reduce = Conv2dNormActivation(low, low_level_channels, kernel_size=1)
        self.refine = nn.Sequential(
            Conv2dNormActivation(CHANNELS + low_level_channels, CHANNELS, kernel_size=3),
            Conv2dNormActivation(CHANNELS, CHANNELS, kernel_size=3),
        )
        self.classifier = nn.Conv2d(CHANNELS, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.aspp:
            _check_batch(self, x)
        features = self.encoder(x)
        low = self.reduce(features[self.low_level_index])
        context = resize_to(self.context(features[-1]), low.shape[-2:])
        y = self.refine(torch.cat([context, low], dim=1))
        return resize_to(self.classifier(y), x.shape[-2:])
