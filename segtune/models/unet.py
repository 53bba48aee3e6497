"""U-Nets: the study's classic UNet (`backbone: none`) and a U-Net decoder over any encoder.

Both take inputs of any size: every upsampled map is resized to the skip it meets (odd sizes
do not halve evenly), and the logits come out at the input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from segtune.models.encoders import Encoder, resize_to


class DoubleConv(nn.Sequential):
    """(conv3x3-BN-ReLU) x 2, the U-Net block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            Conv2dNormActivation(in_channels, out_channels, kernel_size=3),
            Conv2dNormActivation(out_channels, out_channels, kernel_size=3),
        )


class UpBlock(nn.Module):
    """Transposed-conv 2x upsampling, concatenation with the skip, dropout, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.dropout = nn.Dropout2d(dropout)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = resize_to(self.up(x), skip.shape[-2:])
        return self.conv(self.dropout(torch.cat([skip, x], dim=1)))


class UNet(nn.Module):
    """The classic U-Net of Ronneberger et al. as the study trained it, without a backbone.

    Widths start at `min_channels` and double with each of the `depth` down blocks up to
    `max_channels`; max pooling goes down, transposed convolutions come back up. Inputs
    need at least 2**depth pixels a side.
    """

    def __init__(
        self,
        num_classes: int,
        min_channels: int = 32,
        max_channels: int = 256,
        depth: int = 4,
        dropout: float = 0.1,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        widths = [min(min_channels * 2**i, max_channels) for i in range(depth + 1)]
        self.stem = DoubleConv(in_channels, widths[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i], widths[i + 1]))
            for i in range(depth)
        )
        self.up = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], dropout) for i in reversed(range(depth))
        )
        self.classifier = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(x)
        for up in self.up:
            x = up(x, skips.pop())
        return self.classifier(x)  # the last skip is the stem's, at the input size


class DecoderBlock(nn.Module):
    """Bilinear upsampling to the skip's size, concatenation, dropout, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if skip_channels else nn.Identity()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x: Tensor, size: Sequence[int], skip: Tensor | None = None) -> Tensor:
        x = resize_to(x, size)
        if skip is not None:
            x = self.dropout(torch.cat([skip, x], dim=1))
        return self.conv(x)


class EncoderUNet(nn.Module):
    """A U-Net decoder over an encoder's five maps, as segmentation_models_pytorch's Unet.

    Four blocks climb the skips from stride 16 to stride 2; the fifth upsamples to the
    input size without a skip.
    """

    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != len(encoder.out_channels):
            raise ValueError(f"need {len(encoder.out_channels)} decoder widths: {decoder_channels}")
        self.encoder = encoder
        skip_channels = [*encoder.out_channels[-2::-1], 0]
        in_channels = [encoder.out_channels[-1], *decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            DecoderBlock(i, s, o, dropout)
            for i, s, o in zip(in_channels, skip_channels, decoder_channels, strict=True)
        )
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        *skips, y = self.encoder(x)
        for block in self.decoder:
            skip = skips.pop() if skips else None
            y = block(y, size if skip is None else skip.shape[-2:], skip)
        return self.classifier(y)
