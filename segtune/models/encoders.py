"""Encoder registry: torchvision backbones behind one feature contract.

Every encoder maps an image to five feature maps, the deepest activation at each of the
nominal strides 2, 4, 8, 16 and 32, and declares their `out_channels` and actual `strides`,
so every decoder works with every encoder (the encoder/decoder split of
segmentation_models_pytorch). An encoder's state-dict keys are those of the torchvision
network it comes from, less the classifier, so torchvision's ImageNet files load as they are.

Output stride 16 or 8 (DeepLab) trades the last one or two downsamplings for dilation, the
same way for every backbone: the stages past the output stride lose their stride and their
spatial convolutions are dilated by 2 (stride-16 stage) or 4 (stride-32 stage), as
torchvision's `deeplabv3_mobilenet_v3_large` does. torchvision's own
`replace_stride_with_dilation` is not used because its `BasicBlock` (ResNet-18/34) refuses
dilation. VGG follows DeepLab-v1: its stride-removed pools become 3x3 stride-1 pools.

`pretrained: imagenet` loads torchvision's file for the backbone from the torch hub cache,
downloading it there first when it is missing (segtune.models.weights: torchvision's URL or
the mirror, its hash checked, once per node).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models import vgg
from torchvision.models._api import WeightsEnum
from torchvision.models._utils import IntermediateLayerGetter

from segtune.errors import ConfigError, ModelError
from segtune.models.checkpoint import load_dict
from segtune.models.weights import Download, fetch, torchvision_download, url_download

log = logging.getLogger(__name__)

# how weights-file errors name the `pretrained` key and its values
PRETRAINED = "pretrained (none, imagenet, the path of a state dict or its URL#sha256=HEX)"

NOMINAL_STRIDES: tuple[int, ...] = (2, 4, 8, 16, 32)
OUTPUT_STRIDES: tuple[int, ...] = (8, 16, 32)
_PROBE_SIZE = 64  # input side of the pass that locates a trunk's stages; a multiple of 32


class Encoder(nn.Module):
    """What decoders rely on: `forward(x)` returns five maps with `out_channels` and `strides`."""

    name: str
    out_channels: list[int]
    strides: list[int]
    head_prefixes: tuple[str, ...]  # torchvision classifier keys, absent from the encoder

    def load_backbone_state_dict(self, state: Mapping[str, Any], source: str) -> None:
        """Load torchvision-layout weights (classifier keys are dropped) or an encoder's own."""
        kept = {k: v for k, v in state.items() if not k.startswith(self.head_prefixes)}
        load_state_checked(self, kept, source, f"the {self.name} encoder")


class ResNetEncoder(IntermediateLayerGetter, Encoder):
    """A torchvision ResNet without avgpool/fc: stem ReLU (stride 2), then layer1..layer4."""

    head_prefixes = ("fc.",)
    _stages = (
        ("conv1", "bn1", "relu"),
        ("maxpool", "layer1"),
        ("layer2",),
        ("layer3",),
        ("layer4",),
    )

    def __init__(self, name: str, resnet: tvm.ResNet, output_stride: int) -> None:
        _apply_output_stride(resnet, self._stages, output_stride)
        super().__init__(
            resnet,
            {names[-1]: f"s{s}" for names, s in zip(self._stages, NOMINAL_STRIDES, strict=True)},
        )
        expansion = resnet.layer1[0].expansion
        self.name = name
        self.out_channels = [64, *(width * expansion for width in (64, 128, 256, 512))]
        self.strides = _strides(output_stride)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return list(super().forward(x).values())


class TrunkEncoder(Encoder):
    """A sequential convolutional trunk (torchvision's `features` of VGG, MobileNet, EfficientNet).

    The returned maps are the outputs of the last child at each stride, found with one
    probe pass, so the registry needs no per-network index tables.
    """

    head_prefixes = ("classifier.",)

    def __init__(self, name: str, trunk: nn.Sequential, output_stride: int) -> None:
        super().__init__()
        ends, channels = _stage_ends(name, trunk)
        starts = [0, *(end + 1 for end in ends[:-1])]
        stages = [[str(i) for i in range(a, b + 1)] for a, b in zip(starts, ends, strict=True)]
        _apply_output_stride(trunk, stages, output_stride)
        self.features = IntermediateLayerGetter(
            trunk, {str(end): f"s{s}" for end, s in zip(ends, NOMINAL_STRIDES, strict=True)}
        )
        self.name = name
        self.out_channels = channels
        self.strides = _strides(output_stride)

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.features(x).values())


def _strides(output_stride: int) -> list[int]:
    return [min(s, output_stride) for s in NOMINAL_STRIDES]


def _stage_ends(name: str, trunk: nn.Sequential) -> tuple[list[int], list[int]]:
    """Index and channel count of the last child at each nominal stride (eval mode, no grad)."""
    found: dict[int, tuple[int, int]] = {}
    was_training = trunk.training
    trunk.eval()  # the probe must not move BatchNorm running statistics
    x = torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE)
    with torch.inference_mode():
        for index, child in enumerate(trunk):
            x = child(x)
            found[_PROBE_SIZE // x.shape[-1]] = (index, x.shape[1])
    trunk.train(was_training)
    if not set(NOMINAL_STRIDES) <= set(found):
        raise ModelError(
            f"backbone {name} does not reach strides {NOMINAL_STRIDES}: {sorted(found)}"
        )
    return [found[s][0] for s in NOMINAL_STRIDES], [found[s][1] for s in NOMINAL_STRIDES]


def _apply_output_stride(
    container: nn.Module, stages: Sequence[Sequence[str]], output_stride: int
) -> None:
    """Dilate every stage (child names per nominal stride) that lies past `output_stride`."""
    for names, stride in zip(stages, NOMINAL_STRIDES, strict=True):
        rate = stride // output_stride
        if rate > 1:
            for name in names:
                _dilate(container, name, rate)


def _dilate(container: nn.Module, name: str, rate: int) -> None:
    """Remove the downsampling of child `name` and dilate its spatial convolutions by `rate`."""
    child = container.get_submodule(name)
    if isinstance(child, nn.MaxPool2d):  # VGG: keep the pooling, lose the stride
        setattr(container, name, nn.MaxPool2d(kernel_size=3, stride=1, padding=1))
        return
    for module in child.modules():
        if isinstance(module, nn.Conv2d):
            module.stride = (1, 1)
            if module.kernel_size != (1, 1):
                module.dilation = (rate, rate)
                module.padding = tuple((k - 1) // 2 * rate for k in module.kernel_size)


def _vgg_trunk(config: str) -> nn.Sequential:
    """VGG's convolutional part alone, initialised as torchvision's VGG does.

    torchvision's `vgg*_bn()` also builds a 120M-parameter classifier that an encoder drops,
    which costs about two seconds per model.
    """
    trunk = vgg.make_layers(vgg.cfgs[config], batch_norm=True)
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return trunk


@dataclass(frozen=True)
class _Backbone:
    """A registry entry: how to build the network and which ImageNet weights fit it."""

    build: Callable[[], nn.Module]  # a fresh torchvision ResNet, or a sequential trunk
    weights: WeightsEnum
    resnet: bool = False


_BACKBONES: dict[str, _Backbone] = {
    "resnet18": _Backbone(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, resnet=True),
    "resnet34": _Backbone(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, resnet=True),
    "resnet50": _Backbone(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, resnet=True),
    "resnet101": _Backbone(tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V2, resnet=True),
    "vgg11_bn": _Backbone(lambda: _vgg_trunk("A"), tvm.VGG11_BN_Weights.IMAGENET1K_V1),
    "vgg16_bn": _Backbone(lambda: _vgg_trunk("D"), tvm.VGG16_BN_Weights.IMAGENET1K_V1),
    "mobilenet_v3_small": _Backbone(
        lambda: tvm.mobilenet_v3_small().features, tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    ),
    "mobilenet_v3_large": _Backbone(
        lambda: tvm.mobilenet_v3_large().features, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2
    ),
    "mobilenet_v2": _Backbone(
        lambda: tvm.mobilenet_v2().features, tvm.MobileNet_V2_Weights.IMAGENET1K_V2
    ),
    "efficientnet_b0": _Backbone(
        lambda: tvm.efficientnet_b0().features, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1
    ),
}


def encoder_names() -> list[str]:
    """Every registered backbone name, in registry order."""
    return list(_BACKBONES)


def _backbone(name: str) -> _Backbone:
    try:
        return _BACKBONES[name]
    except KeyError:
        raise ConfigError(
            f"backbone: unknown {name!r}; valid: {', '.join(encoder_names())}"
        ) from None


def build_encoder(name: str, pretrained: str = "none", output_stride: int = 32) -> Encoder:
    """Build a registered encoder; `pretrained` is none, imagenet, a state-dict file or its
    URL with `#sha256=`."""
    spec = _backbone(name)
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(
            f"output_stride: {output_stride} is not one of {', '.join(map(str, OUTPUT_STRIDES))}"
        )
    encoder: Encoder
    if spec.resnet:
        encoder = ResNetEncoder(name, spec.build(), output_stride)
    else:
        encoder = TrunkEncoder(name, spec.build(), output_stride)
    # torchvision's MobileNet/EfficientNet BatchNorms use momentum 0.01, tuned for 600-epoch
    # ImageNet runs; in a sweep of a few hundred steps their running statistics would still be
    # near their initial values and eval-mode outputs near constant.
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    if pretrained != "none":
        path = pretrained_file(pretrained, name)
        state = load_dict(path, PRETRAINED)
        if pretrained != "imagenet" and isinstance(state.get("model"), Mapping):
            raise ModelError(
                f"pretrained: {pretrained} is a segtune checkpoint of a whole model; "
                "load it with build_model, or pass the state dict of a backbone"
            )
        encoder.load_backbone_state_dict(state, str(path))
    return encoder


def imagenet_download(backbone: str) -> Download:
    """torchvision's ImageNet file for `backbone`: its URL (or the mirror's) and hub cache path."""
    return torchvision_download(backbone, _backbone(backbone).weights.url)


def pretrained_weights_file(backbone: str) -> Path:
    """Where `pretrained: imagenet` keeps the torchvision file: the torch hub cache."""
    return imagenet_download(backbone).path


def pretrained_file(pretrained: str, backbone: str) -> Path:
    """The local file of a `pretrained` value other than none: torchvision's for imagenet, or
    a URL's, in the hub cache (downloaded there first when missing); else the path given."""
    download = imagenet_download(backbone) if pretrained == "imagenet" else url_download(pretrained)
    if download is None:
        return Path(pretrained)
    path = fetch(download)
    what = f"imagenet ({backbone})" if pretrained == "imagenet" else pretrained.partition("#")[0]
    log.info("pretrained %s: %s", what, path)
    return path


def load_state_checked(
    module: nn.Module, state: Mapping[str, Any], source: str, target: str
) -> None:
    """`load_state_dict` whose failures name the file and the first offending keys.

    A missing `num_batches_tracked` is tolerated: older torchvision files predate it.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(getattr(state[k], 'shape', ()))} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and not (isinstance(state[k], Tensor) and state[k].shape == v.shape)
    ]
    problems = [
        f"{what} {', '.join(keys[:4])}{f', ... ({len(keys)} in all)' if len(keys) > 4 else ''}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", reshaped),
        )
        if keys
    ]
    if problems:
        raise ModelError(f"{source} does not fit {target}: {'; '.join(problems)}")
    module.load_state_dict(state, strict=False)


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize to `size`, the map a decoder meets next or the input.

    Features of odd-sized inputs do not line up after 2x upsampling. The resize runs even
    when the sizes already agree (it is then exact): a graph traced or exported at one size
    must still resize at another.
    """
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
