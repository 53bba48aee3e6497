"""Losses against F.cross_entropy and hand-written references; class weights in exact numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segtune.classes import IGNORE_INDEX, NUM_CLASSES
from segtune.errors import ConfigError, DatasetError
from segtune.training.losses import (
    LOSS_NAMES,
    FocalLoss,
    build_loss,
    class_weights,
)

C = NUM_CLASSES
SHAPE = (2, 12, 16)  # N, H, W
WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 0.0, 1.5, 3.0, 1.0, 0.25])


def batch(seed: int = 0, ignored: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and targets where classes 6 and 7 are absent and some pixels are ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(SHAPE[0], C, *SHAPE[1:], generator=g) * 2
    target = torch.randint(0, 6, SHAPE, generator=g)
    target[torch.rand(SHAPE, generator=g) < ignored] = IGNORE_INDEX
    return logits, target


def perfect_logits(target: torch.Tensor) -> torch.Tensor:
    """Huge logits on the true class (ignored pixels get class 0)."""
    safe = target.masked_fill(target == IGNORE_INDEX, 0)
    return F.one_hot(safe, C).permute(0, 3, 1, 2).float() * 100.0


ALL = [(name, w) for name in LOSS_NAMES for w in (None, WEIGHTS)]
IDS = [f"{name}-{'weighted' if w is not None else 'plain'}" for name, w in ALL]


@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_ce_equals_torch_cross_entropy(weights: torch.Tensor | None) -> None:
    logits, target = batch()
    got = build_loss("ce", class_weights=weights)(logits, target)
    want = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE_INDEX)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_focal_with_gamma_zero_is_cross_entropy(weights: torch.Tensor | None) -> None:
    logits, target = batch(seed=1)
    got = FocalLoss(gamma=0.0, weight=weights)(logits, target)
    want = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE_INDEX)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_focal_matches_a_per_pixel_reference() -> None:
    logits, target = batch(seed=2)
    got = build_loss("focal", class_weights=WEIGHTS)(logits, target)
    p = logits.double().softmax(1).numpy()
    t = target.numpy()
    w = WEIGHTS.double().numpy()
    num = den = 0.0
    for n, y, x in zip(*np.nonzero(t != IGNORE_INDEX), strict=True):
        pt = p[n, t[n, y, x], y, x]
        num += -w[t[n, y, x]] * (1 - pt) ** 2 * np.log(pt)
        den += w[t[n, y, x]]
    assert got.item() == pytest.approx(num / den, rel=1e-5)


def test_dice_matches_a_per_class_reference() -> None:
    logits, target = batch(seed=3)
    p = logits.double().softmax(1).numpy()
    t = target.numpy()
    valid = t != IGNORE_INDEX
    dice = {}
    for c in range(C):
        truth = (t == c) & valid
        if truth.any():  # classes 6 and 7 are absent from the target: left out
            pc = p[:, c] * valid
            dice[c] = 2 * (pc * truth).sum() / (pc.sum() + truth.sum())
    assert sorted(dice) == [0, 1, 2, 3, 4, 5]
    plain = np.mean([1 - d for d in dice.values()])
    w = WEIGHTS.double().numpy()
    weighted = sum(w[c] * (1 - d) for c, d in dice.items()) / sum(w[c] for c in dice)
    assert build_loss("dice")(logits, target).item() == pytest.approx(plain, rel=1e-5)
    got = build_loss("dice", class_weights=WEIGHTS)(logits, target).item()
    assert got == pytest.approx(weighted, rel=1e-5)


def test_ce_dice_is_the_sum() -> None:
    logits, target = batch(seed=4)
    total = build_loss("ce_dice", class_weights=WEIGHTS)(logits, target)
    parts = build_loss("ce", WEIGHTS)(logits, target) + build_loss("dice", WEIGHTS)(logits, target)
    assert total.item() == pytest.approx(parts.item(), rel=1e-6)


@pytest.mark.parametrize(("name", "weights"), ALL, ids=IDS)
def test_finite_and_differentiable_with_ignored_pixels(
    name: str, weights: torch.Tensor | None
) -> None:
    logits, target = batch(seed=5)
    logits.requires_grad_(True)
    loss = build_loss(name, class_weights=weights)(logits, target)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    ignored = (target == IGNORE_INDEX)[:, None].expand_as(logits)
    assert logits.grad[ignored].abs().max().item() == 0.0
    assert logits.grad[~ignored].abs().max().item() > 0.0


@pytest.mark.parametrize(("name", "weights"), ALL, ids=IDS)
def test_ignored_pixels_do_not_change_loss_or_gradients(
    name: str, weights: torch.Tensor | None
) -> None:
    logits, target = batch(seed=6)
    ignored = (target == IGNORE_INDEX)[:, None].expand_as(logits)
    other = torch.where(ignored, torch.randn_like(logits) * 50, logits)
    loss_fn = build_loss(name, class_weights=weights)
    results = []
    for x in (logits, other):
        x = x.clone().requires_grad_(True)
        loss = loss_fn(x, target)
        loss.backward()
        results.append((loss.item(), x.grad[~ignored]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_perfect_prediction_gives_zero(name: str) -> None:
    _, target = batch(seed=7)
    loss = build_loss(name, class_weights=WEIGHTS)(perfect_logits(target), target)
    assert 0.0 <= loss.item() < 1e-6


@pytest.mark.parametrize(("name", "weights"), ALL, ids=IDS)
def test_batch_without_labelled_pixels_gives_zero_not_nan(
    name: str, weights: torch.Tensor | None
) -> None:
    logits, _ = batch(seed=8)
    target = torch.full(SHAPE, IGNORE_INDEX)
    logits.requires_grad_(True)
    loss = build_loss(name, class_weights=weights)(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad.abs().max().item() == 0.0
    # only pixels of a class with weight 0 (class 3 in WEIGHTS) behaves the same when weighted
    if weights is not None:
        assert build_loss(name, class_weights=weights)(logits, torch.full(SHAPE, 3)).item() == 0.0


def test_half_precision_logits_and_uint8_targets() -> None:
    logits, target = batch(seed=9, ignored=0.0)
    for name in LOSS_NAMES:
        loss_fn = build_loss(name, class_weights=WEIGHTS)
        want = loss_fn(logits, target)
        got = loss_fn(logits.to(torch.bfloat16), target.to(torch.uint8))
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), rel=0.05)


def test_weights_are_a_buffer_that_follows_the_module() -> None:
    loss_fn = build_loss("ce_dice", class_weights=WEIGHTS.tolist())
    state = loss_fn.state_dict()
    assert set(state) == {"ce.weight", "dice.weight"}
    torch.testing.assert_close(state["ce.weight"], WEIGHTS)
    assert loss_fn.to(torch.float64).ce.weight.dtype == torch.float64
    assert "weight" not in build_loss("ce").state_dict()


def test_bad_names_and_weights() -> None:
    with pytest.raises(ConfigError, match="ce, dice, focal, ce_dice") as info:
        build_loss("lovasz")
    assert "'lovasz'" in str(info.value)
    with pytest.raises(ValueError, match="class weights"):
        build_loss("ce", class_weights=[1.0, -1.0])
    logits, target = batch()
    with pytest.raises(ValueError, match="3 class weights for 8 classes"):
        build_loss("focal", class_weights=[1.0, 1.0, 1.0])(logits, target)


def test_class_weight_modes_on_a_toy_frequency_vector() -> None:
    freqs = np.array([10, 0, 30, 60])
    assert class_weights(freqs, "none") is None
    inverse = class_weights(freqs, "inverse")
    # 1/f over present classes is (0.1, 1/30, 1/60) with mean 0.05
    torch.testing.assert_close(inverse, torch.tensor([2.0, 0.0, 2 / 3, 1 / 3]))
    assert inverse[freqs > 0].mean().item() == pytest.approx(1.0)
    # fractions (0.1, 0, 0.3, 0.6); median over present classes is 0.3
    torch.testing.assert_close(class_weights(freqs, "median"), torch.tensor([3.0, 0.0, 1.0, 0.5]))
    # only ratios matter
    torch.testing.assert_close(class_weights(freqs / 7.0, "median"), class_weights(freqs, "median"))
    with pytest.raises(ConfigError, match="none, inverse, median"):
        class_weights(freqs, "sqrt")
    with pytest.raises(DatasetError, match="ignore index"):
        class_weights(np.zeros(4), "inverse")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_cuda_matches_cpu(name: str) -> None:
    logits, target = batch(seed=10)
    loss_fn = build_loss(name, class_weights=WEIGHTS)
    want = loss_fn(logits, target)
    loss_fn.to("cuda")
    got = loss_fn(logits.cuda(), target.cuda())
    assert got.device.type == "cuda"
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    empty = torch.full(SHAPE, IGNORE_INDEX, device="cuda")
    assert loss_fn(logits.cuda(), empty).item() == 0.0
