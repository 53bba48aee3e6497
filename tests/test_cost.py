"""The cost library: exact static costs, timings that run (never their values), models left alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from segtune.config.names import MODEL_COSTS
from segtune.errors import ConfigError
from segtune.models import cost

HW = (48, 64)  # (H, W), i.e. 64x48
NO_GPU = not torch.cuda.is_available()


# tiny_net's parameters (conv 3->16 3x3, BN of 16, conv 16->8 1x1) and FLOPs at HW, by hand:
# two FLOPs per multiply-add of each convolution
TINY_PARAMS = 3 * 16 * 9 + 16 + 16 * 2 + 16 * 8 + 8
TINY_FLOPS = 2 * (16 * 3 * 9 + 8 * 16) * HW[0] * HW[1]


def tiny_net() -> nn.Module:
    """Conv-BN-ReLU-Dropout-Conv: has buffers, train/eval behaviour and 8 output classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Dropout2d(0.2),
        nn.Conv2d(16, 8, 1),
    )


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
        assert after[key].device.type == "cpu"
    assert all(p.is_contiguous() for p in model.parameters())


def test_count_params_is_sum_of_numel_in_millions() -> None:
    model = tiny_net()
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMS
    assert cost.count_params(model) == TINY_PARAMS / 1e6


def test_state_dict_mb_matches_checkpoint_on_disk(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 64, 3))
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    on_disk = path.stat().st_size / 1e6
    assert cost.state_dict_mb(model) == pytest.approx(on_disk, rel=0.01)
    assert on_disk > 0.1  # large enough for 1% to mean something


def test_gflops_of_a_conv_is_two_flops_per_multiply_add() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert cost.gflops(conv, (16, 16)) == 2 * 8 * 3 * 9 * 16 * 16 / 1e9
    assert cost.gflops(conv, (16, 32)) == 2 * 8 * 3 * 9 * 16 * 32 / 1e9


def test_gflops_leaves_model_in_train_mode() -> None:
    model = tiny_net().train()
    before = snapshot(model)
    assert cost.gflops(model, HW) == pytest.approx(TINY_FLOPS / 1e9, rel=1e-12)
    assert all(modes(model))
    assert_unchanged(model, before)


def test_cpu_latency_runs_batch_one_and_restores_threads_and_mode() -> None:
    model = tiny_net().train()
    model[1].eval()  # a frozen BatchNorm inside a training model must stay frozen
    flags, before = modes(model), snapshot(model)
    shapes: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = cost.cpu_latency_ms(model, HW, threads=2, warmup=1, repeats=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert ms > 0 and math.isfinite(ms)
    assert shapes == [(1, 3, 48, 64)] * 3  # one warm-up and two timed runs at (H, W)
    assert modes(model) == flags
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 0}, "threads"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"input_hw": (0, 8)}, "input size"),
    ],
)
def test_cpu_latency_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cost.cpu_latency_ms(tiny_net(), **{"input_hw": HW, **kwargs})


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_gpu_latency_without_gpu_gives_a_reason_not_a_number() -> None:
    ms, reason = cost.gpu_latency_ms(tiny_net(), HW, warmup=1, repeats=2)
    assert ms is None
    assert reason and ("CUDA" in reason)
    assert reason == cost.gpu_skip_reason()


def test_gpu_latency_rejects_unknown_amp() -> None:
    with pytest.raises(ConfigError, match="amp 'half'"):
        cost.gpu_latency_ms(tiny_net(), HW, amp="half")


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_gpu_latency_on_gpu_is_measured_and_leaves_model_alone() -> None:
    model = tiny_net().train()
    before = snapshot(model)
    for amp in ("off", "auto"):
        ms, reason = cost.gpu_latency_ms(model, HW, warmup=1, repeats=2, amp=amp)
        assert reason is None and ms is not None and ms > 0 and math.isfinite(ms)
    assert all(modes(model))
    assert_unchanged(model, before)


def test_measure_cost_has_the_design_keys_and_no_invented_gpu_number(tmp_path: Path) -> None:
    model = tiny_net().train()
    before = snapshot(model)
    measured = cost.measure_cost(model, HW, threads=1, repeats=2, warmup=1)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    assert measured["params_m"] == TINY_PARAMS / 1e6
    on_disk = (tmp_path / "state.pt").stat().st_size / 1e6  # archive names differ by a few bytes
    assert measured["size_mb"] == pytest.approx(on_disk, rel=0.02)
    assert measured["gflops"] == pytest.approx(TINY_FLOPS / 1e9, rel=1e-12)
    assert measured["infer_ms_cpu"] > 0 and math.isfinite(measured["infer_ms_cpu"])
    assert measured["bench_input"] == "64x48"
    assert (measured["bench_threads"], measured["bench_repeats"], measured["bench_warmup"]) == (
        1,
        2,
        1,
    )
    assert measured["torch_version"] == torch.__version__
    assert measured["cpu_name"]
    if NO_GPU:
        assert "infer_ms_gpu" not in measured and "gpu_name" not in measured
        assert measured["gpu_skip_reason"] == cost.gpu_skip_reason()
    else:
        assert measured["infer_ms_gpu"] > 0 and measured["gpu_name"]
        assert "gpu_skip_reason" not in measured
    assert all(modes(model))
    assert_unchanged(model, before)


def test_measure_cost_without_gpu_says_it_was_disabled() -> None:
    measured = cost.measure_cost(tiny_net(), HW, threads=1, repeats=1, warmup=0, gpu=False)
    assert "infer_ms_gpu" not in measured
    assert "disabled" in measured["gpu_skip_reason"]
    assert set(MODEL_COSTS) - set(measured) == {"infer_ms_gpu"}
