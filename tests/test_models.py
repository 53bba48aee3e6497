"""Models: the encoder contract, every (arch, backbone, aspp) variant, weights loading, errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from segtune.classes import NUM_CLASSES
from segtune.config.trial import WEIGHTS_MIRROR_ENV
from segtune.errors import ConfigError, ModelError
from segtune.models import (
    ARCHS,
    DeepLabV3,
    DeepLabV3Plus,
    EncoderUNet,
    UNet,
    build_encoder,
    build_model,
    encoder_names,
    model_variants,
    pretrained_weights_file,
)
from segtune.models.encoders import imagenet_download
from tests.servers import free_port

REQUIRED_BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11_bn",
    "vgg16_bn",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
)
SMALL_UNET = {"unet_min_channels": 8, "unet_max_channels": 32}  # the classic UNet, kept cheap


def variant_id(variant: dict[str, Any]) -> str:
    aspp = "" if variant["arch"] == "unet" else ("-aspp" if variant["aspp"] else "-noaspp")
    return f"{variant['arch']}-{variant['backbone']}{aspp}"


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def randomize_bn(module: nn.Module) -> None:
    """Give BatchNorm buffers non-default values, so that a weights comparison means something."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)


# --- registry -----------------------------------------------------------------------------


def test_registry_lists_every_valid_combination() -> None:
    names = encoder_names()
    assert set(REQUIRED_BACKBONES) <= set(names)
    assert ARCHS == ("unet", "deeplabv3", "deeplabv3plus")
    variants = model_variants()
    assert len(variants) == (1 + len(names)) + 2 * 2 * len(names)
    assert len({variant_id(v) for v in variants}) == len(variants)
    unet = [v for v in variants if v["arch"] == "unet"]
    assert [v["backbone"] for v in unet] == ["none", *names]
    assert all(v["aspp"] is False for v in unet)
    for arch in ("deeplabv3", "deeplabv3plus"):
        combos = {(v["backbone"], v["aspp"]) for v in variants if v["arch"] == arch}
        assert combos == {(n, a) for n in names for a in (True, False)}


# --- encoders -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", encoder_names())
def test_encoder_contract(name: str) -> None:
    encoder = build_encoder(name).eval()
    assert encoder.strides == [2, 4, 8, 16, 32]
    with torch.inference_mode():
        features = encoder(torch.randn(1, 3, 256, 256))
    assert len(features) == 5 == len(encoder.out_channels)
    assert [f.shape[1] for f in features] == encoder.out_channels
    assert [tuple(f.shape[-2:]) for f in features] == [
        (256 // s, 256 // s) for s in encoder.strides
    ]


@pytest.mark.parametrize(
    ("name", "output_stride", "strides"),
    [
        ("resnet18", 16, [2, 4, 8, 16, 16]),
        ("resnet18", 8, [2, 4, 8, 8, 8]),
        ("resnet50", 8, [2, 4, 8, 8, 8]),
        ("vgg11_bn", 16, [2, 4, 8, 16, 16]),
        ("vgg11_bn", 8, [2, 4, 8, 8, 8]),
        ("mobilenet_v3_small", 8, [2, 4, 8, 8, 8]),
        ("efficientnet_b0", 16, [2, 4, 8, 16, 16]),
    ],
)
def test_output_stride_by_dilation(name: str, output_stride: int, strides: list[int]) -> None:
    plain = build_encoder(name)
    dilated = build_encoder(name, output_stride=output_stride).eval()
    assert dilated.strides == strides
    assert dilated.out_channels == plain.out_channels
    # Same parameters, only strides and dilations change: ImageNet weights still fit.
    assert {k: v.shape for k, v in dilated.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    with torch.inference_mode():
        features = dilated(torch.randn(1, 3, 128, 128))
    assert [128 // f.shape[-1] for f in features] == strides
    assert [f.shape[1] for f in features] == dilated.out_channels


def test_encoder_build_leaves_batchnorm_statistics_untouched() -> None:
    """Locating a trunk's stages runs a probe pass; it must not train the BatchNorms."""
    encoder = build_encoder("mobilenet_v3_small")
    assert encoder.training
    norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    for bn in norms:
        assert int(bn.num_batches_tracked) == 0
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


@pytest.mark.parametrize(
    ("name", "head"),
    [("resnet18", "fc."), ("vgg11_bn", "classifier."), ("mobilenet_v3_small", "classifier.")],
)
def test_encoder_keys_are_torchvision_keys_without_the_classifier(name: str, head: str) -> None:
    full = getattr(tvm, name)().state_dict()
    encoder = build_encoder(name, output_stride=16)
    expected = {k: v.shape for k, v in full.items() if not k.startswith(head)}
    assert {k: v.shape for k, v in encoder.state_dict().items()} == expected
    encoder.load_backbone_state_dict(full, "torchvision")
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, full[key]), key


def test_build_encoder_rejects_unknown_name_and_stride() -> None:
    with pytest.raises(ConfigError, match="resnet18") as info:
        build_encoder("resnet9000")
    assert "resnet9000" in str(info.value)
    with pytest.raises(ConfigError, match="output_stride: 4"):
        build_encoder("resnet18", output_stride=4)


# --- every variant ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", model_variants(), ids=variant_id)
def test_variant_predicts_logits_at_the_input_size(variant: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build_model({**variant, **SMALL_UNET}).eval()
    with torch.inference_mode():
        for h, w in ((64, 64), (98, 70)):  # 98x70: odd at stride 4, no multiple of 32
            logits = model(torch.randn(2, 3, h, w))
            assert logits.shape == (2, NUM_CLASSES, h, w)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "cfg",
    [
        {"arch": "unet", "backbone": "none", **SMALL_UNET},
        {"arch": "deeplabv3", "backbone": "mobilenet_v3_small", "aspp": True},
        {"arch": "deeplabv3plus", "backbone": "mobilenet_v3_small", "aspp": True},
    ],
    ids=lambda cfg: cfg["arch"],
)
def test_seed_image_size(cfg: dict[str, Any]) -> None:
    """The real tiny-FloodNet images are 1000x750 (750 / 16 is not an integer)."""
    model = build_model(cfg).eval()
    with torch.inference_mode():
        logits = model(torch.randn(1, 3, 750, 1000))
    assert logits.shape == (1, NUM_CLASSES, 750, 1000)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("cfg", "kind"),
    [
        ({"arch": "unet", "backbone": "none", **SMALL_UNET}, UNet),
        ({"arch": "unet", "backbone": "resnet18"}, EncoderUNet),
        ({"arch": "deeplabv3", "backbone": "resnet18", "aspp": True}, DeepLabV3),
        ({"arch": "deeplabv3", "backbone": "resnet18", "aspp": False}, DeepLabV3),
        ({"arch": "deeplabv3plus", "backbone": "resnet18", "aspp": True}, DeepLabV3Plus),
        ({"arch": "deeplabv3plus", "backbone": "resnet18", "aspp": False}, DeepLabV3Plus),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else variant_id({"aspp": False, **v}),
)
def test_gradients_reach_every_parameter_in_train_mode(cfg: dict[str, Any], kind: type) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert isinstance(model, kind)
    target = torch.randint(0, NUM_CLASSES, (2, 48, 64))
    loss = F.cross_entropy(model(torch.randn(2, 3, 48, 64)), target)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("arch", ["deeplabv3", "deeplabv3plus"])
def test_aspp_needs_two_samples_in_train_mode_only(arch: str) -> None:
    model = build_model({"arch": arch, "backbone": "mobilenet_v3_small", "aspp": True})
    with pytest.raises(ModelError, match="batch_size >= 2"):
        model.train()(torch.randn(1, 3, 64, 64))
    with torch.inference_mode():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, NUM_CLASSES, 64, 64)
    without = build_model({"arch": arch, "backbone": "mobilenet_v3_small", "aspp": False})
    assert without.train()(torch.randn(1, 3, 64, 64)).shape == (1, NUM_CLASSES, 64, 64)


# --- configuration ------------------------------------------------------------------------


def conv_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    """(channels, height) of every convolution's output in one forward pass, in call order."""
    seen: list[tuple[int, int]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.append((out.shape[1], out.shape[2])))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return seen


def test_trial_keys_reach_the_modules() -> None:
    unet_cfg = {"unet_min_channels": 4, "unet_max_channels": 16, "unet_depth": 3, "dropout": 0.3}
    unet = build_model({"arch": "unet", **unet_cfg})
    assert isinstance(unet, UNet)
    outputs = conv_outputs(unet, torch.randn(1, 3, 64, 64))
    assert outputs[0] == (4, 64)  # the first convolution is unet_min_channels wide
    deepest = min(height for _, height in outputs)
    assert deepest == 64 // 2**3  # unet_depth 3: three halvings
    assert {c for c, h in outputs if h == deepest} == {16}  # doubling, capped at max_channels
    assert {c for c, h in outputs if h == 16} == {16} and {c for c, h in outputs if h == 32} == {8}
    assert {m.p for m in unet.modules() if isinstance(m, nn.Dropout2d)} == {0.3}

    deeplab_cfg = {"aspp_rates": (2, 4, 6), "output_stride": 8, "dropout": 0.25}
    deeplab = build_model({"arch": "deeplabv3", "backbone": "resnet18", **deeplab_cfg})
    assert deeplab.encoder.strides == [2, 4, 8, 8, 8]
    head_convs = [m for m in deeplab.head.modules() if isinstance(m, nn.Conv2d)]
    assert {m.dilation for m in head_convs} - {(1, 1)} == {(2, 2), (4, 4), (6, 6)}
    dropouts = {m.p for m in deeplab.head.modules() if isinstance(m, nn.Dropout | nn.Dropout2d)}
    assert dropouts == {0.25}

    # UNet always runs its encoder at stride 32 and ignores aspp.
    a = build_model({"arch": "unet", "backbone": "resnet18", "aspp": True, "output_stride": 8})
    b = build_model({"arch": "unet", "backbone": "resnet18", "aspp": False})
    assert a.encoder.strides == [2, 4, 8, 16, 32]
    assert a.state_dict().keys() == b.state_dict().keys()


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        ({"arch": "deeplabv3", "backbone": "none"}, ["needs a backbone", "resnet18", "vgg11_bn"]),
        ({"arch": "deeplabv3plus", "backbone": "none"}, ["needs a backbone", "efficientnet_b0"]),
        ({"arch": "deeplabv3", "backbone": "resnet9000"}, ["resnet9000", "mobilenet_v3_small"]),
        ({"arch": "unet", "backbone": "alexnet"}, ["alexnet", "none, resnet18"]),
        ({"arch": "unet", "backbone": "none", "pretrained": "imagenet"}, ["imagenet", "backbone"]),
        ({"arch": "unet", "unet_min_channels": 64, "unet_max_channels": 32}, ["unet_min_channels"]),
        ({"arch": "unet", "unet_depth": 6, "image_size": 32}, ["at least 64"]),
        ({"arch": "deeplabv3", "backbone": "resnet18", "aspp_rates": (0, 6, 12)}, ["aspp_rates"]),
        ({"arch": "pspnet"}, ["arch"]),
    ],
)
def test_impossible_combinations_are_config_errors(cfg: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(cfg)
    for word in words:
        assert word in str(info.value)


# --- pretrained weights -------------------------------------------------------------------


def test_imagenet_weights_missing_name_the_file_and_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision's URL by default; with a mirror, torchvision's file name there (nothing
    answers at this one, so the message names both it and where the file would go)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(WEIGHTS_MIRROR_ENV, raising=False)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert pretrained_weights_file("resnet18") == expected
    assert imagenet_download("resnet18").url == (
        "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    )
    monkeypatch.setenv(WEIGHTS_MIRROR_ENV, f"http://127.0.0.1:{free_port()}/models/")
    with pytest.raises(ModelError) as info:
        build_model({"arch": "deeplabv3", "backbone": "resnet18", "pretrained": "imagenet"})
    message = str(info.value)
    assert str(expected) in message
    assert f"{os.environ[WEIGHTS_MIRROR_ENV]}resnet18-f37072fd.pth" in message


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_imagenet_weights_load_from_the_hub_cache(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torchvision-layout file (classifier included) in the cache is what `imagenet` loads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    reference = getattr(tvm, name)()
    randomize_bn(reference)
    path = pretrained_weights_file(name)
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = build_model({"arch": "deeplabv3plus", "backbone": name, "pretrained": "imagenet"})
    full = reference.state_dict()
    encoder_state = model.encoder.state_dict()
    assert encoder_state
    for key, value in encoder_state.items():
        assert torch.equal(value, full[key]), key


def test_encoder_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = build_encoder("resnet18", output_stride=16)
    randomize_bn(source)
    path = tmp_path / "encoder.pt"
    torch.save(source.state_dict(), path)
    model = build_model({"arch": "deeplabv3", "backbone": "resnet18", "pretrained": str(path)})
    assert_same_weights(model.encoder, source)
    assert_same_weights(build_encoder("resnet18", pretrained=str(path)), source)


@pytest.mark.parametrize(
    "cfg",
    [
        {"arch": "deeplabv3plus", "backbone": "mobilenet_v3_small", "aspp": False},
        {"arch": "unet", "backbone": "none", **SMALL_UNET},
    ],
    ids=["checkpoint", "raw-unet"],
)
def test_whole_model_weights_load(cfg: dict[str, Any], tmp_path: Path) -> None:
    """A segtune checkpoint (dict with `model`) loads everything; so does a raw classic-UNet dict."""
    torch.manual_seed(3)
    source = build_model(cfg)
    randomize_bn(source)
    path = tmp_path / "weights.pt"
    if cfg["backbone"] == "none":
        torch.save(source.state_dict(), path)
    else:
        torch.save({"model": source.state_dict(), "config": cfg, "metrics": {}}, path)
    assert_same_weights(build_model({**cfg, "pretrained": str(path)}), source)
    if cfg["backbone"] != "none":
        with pytest.raises(ModelError, match="build_model"):
            build_encoder(cfg["backbone"], pretrained=str(path))


def test_bad_weights_files_are_model_errors(tmp_path: Path) -> None:
    cfg = {"arch": "deeplabv3", "backbone": "resnet18"}

    wrong = tmp_path / "resnet50.pt"
    torch.save(build_encoder("resnet50").state_dict(), wrong)
    with pytest.raises(ModelError) as info:
        build_model({**cfg, "pretrained": str(wrong)})
    assert str(wrong) in str(info.value)
    assert "layer1.0.conv3.weight" in str(info.value)  # a Bottleneck key a BasicBlock lacks

    partial = tmp_path / "partial.pt"
    state = build_encoder("resnet18").state_dict()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, partial)
    with pytest.raises(ModelError, match=r"missing keys layer4\.1\.bn2\.weight") as info:
        build_model({**cfg, "pretrained": str(partial)})
    assert "unexpected keys extra.weight" in str(info.value)

    shapes = tmp_path / "shapes.pt"
    state = build_encoder("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, shapes)
    with pytest.raises(ModelError, match=r"wrong shapes conv1\.weight \(64, 3, 3, 3\) vs"):
        build_model({**cfg, "pretrained": str(shapes)})

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a state dict")
    with pytest.raises(ModelError, match="corrupt.pt"):
        build_model({**cfg, "pretrained": str(corrupt)})

    with pytest.raises(ModelError, match="imagnet"):
        build_model({**cfg, "pretrained": "imagnet"})  # a typo, not a file
