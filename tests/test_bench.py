"""Cost measurement: exact static costs, timings that run (never their values), the CLI."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from segtune import bench
from segtune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
HW = (48, 64)  # (H, W), i.e. 64x48
NO_GPU = not torch.cuda.is_available()


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1000x750", (750, 1000)), ("64x48", (48, 64)), (" 32X16 ", (16, 32)), ("1x1", (1, 1))],
)
def test_parse_hw_reads_width_then_height(text: str, expected: tuple[int, int]) -> None:
    assert bench.parse_hw(text) == expected
    assert bench.parse_hw(bench.format_hw(expected)) == expected


@pytest.mark.parametrize(
    "text", ["1000", "1000x", "x750", "axb", "0x10", "10x0", "-1x5", "2x3x4", ""]
)
def test_parse_hw_rejects_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError, match="WIDTHxHEIGHT|at least 1"):
        bench.parse_hw(text)


def test_format_hw_writes_width_first() -> None:
    assert bench.format_hw((750, 1000)) == "1000x750"
    with pytest.raises(ConfigError):
        bench.format_hw((0, 10))


def test_count_params_is_sum_of_numel_in_millions() -> None:
    model = tiny_net()
    expected = sum(p.numel() for p in model.parameters())
    assert expected == 3 * 16 * 9 + 16 + 16 * 2 + 16 * 8 + 8
    assert bench.count_params(model) == expected / 1e6


def test_state_dict_mb_matches_checkpoint_on_disk(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 64, 3))
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    on_disk = path.stat().st_size / 1e6
    assert bench.state_dict_mb(model) == pytest.approx(on_disk, rel=0.01)
    assert on_disk > 0.1  # large enough for 1% to mean something


def test_gflops_of_a_conv_is_two_flops_per_multiply_add() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert bench.gflops(conv, (16, 16)) == 2 * 8 * 3 * 9 * 16 * 16 / 1e9
    assert bench.gflops(conv, (16, 32)) == 2 * 8 * 3 * 9 * 16 * 32 / 1e9


def test_gflops_leaves_model_in_train_mode() -> None:
    model = tiny_net().train()
    before = snapshot(model)
    assert bench.gflops(model, HW) == pytest.approx(
        2 * (16 * 3 * 9 + 8 * 16) * HW[0] * HW[1] / 1e9, rel=1e-12
    )
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
        ms = bench.cpu_latency_ms(model, HW, threads=2, warmup=1, repeats=2)
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
        bench.cpu_latency_ms(tiny_net(), **{"input_hw": HW, **kwargs})


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_gpu_latency_without_gpu_gives_a_reason_not_a_number() -> None:
    ms, reason = bench.gpu_latency_ms(tiny_net(), HW, warmup=1, repeats=2)
    assert ms is None
    assert reason and ("CUDA" in reason)
    assert reason == bench.gpu_skip_reason()


def test_gpu_latency_rejects_unknown_amp() -> None:
    with pytest.raises(ConfigError, match="amp 'half'"):
        bench.gpu_latency_ms(tiny_net(), HW, amp="half")


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_gpu_latency_on_gpu_is_measured_and_leaves_model_alone() -> None:
    model = tiny_net().train()
    before = snapshot(model)
    for amp in ("off", "auto"):
        ms, reason = bench.gpu_latency_ms(model, HW, warmup=1, repeats=2, amp=amp)
        assert reason is None and ms is not None and ms > 0 and math.isfinite(ms)
    assert all(modes(model))
    assert_unchanged(model, before)


def test_measure_cost_has_the_design_keys_and_no_invented_gpu_number() -> None:
    model = tiny_net().train()
    before = snapshot(model)
    cost = bench.measure_cost(model, HW, threads=1, repeats=2, warmup=1)
    assert cost["params_m"] == bench.count_params(model)
    assert cost["size_mb"] == pytest.approx(bench.state_dict_mb(model))
    assert cost["gflops"] == bench.gflops(model, HW)
    assert cost["infer_ms_cpu"] > 0 and math.isfinite(cost["infer_ms_cpu"])
    assert cost["bench_input"] == "64x48"
    assert (cost["bench_threads"], cost["bench_repeats"], cost["bench_warmup"]) == (1, 2, 1)
    assert cost["torch_version"] == torch.__version__
    assert cost["cpu_name"]
    if NO_GPU:
        assert "infer_ms_gpu" not in cost and "gpu_name" not in cost
        assert cost["gpu_skip_reason"] == bench.gpu_skip_reason()
    else:
        assert cost["infer_ms_gpu"] > 0 and cost["gpu_name"]
        assert "gpu_skip_reason" not in cost
    assert all(modes(model))
    assert_unchanged(model, before)


def test_measure_cost_without_gpu_says_it_was_disabled() -> None:
    cost = bench.measure_cost(tiny_net(), HW, threads=1, repeats=1, warmup=0, gpu=False)
    assert "infer_ms_gpu" not in cost
    assert "disabled" in cost["gpu_skip_reason"]
    assert set(bench.METRIC_KEYS) - set(cost) == {"infer_ms_gpu"}


def test_model_label_drops_augment() -> None:
    assert bench.model_label({"arch": "unet", "backbone": "none", "aspp": False}) == "unet-none"
    assert (
        bench.model_label({"arch": "deeplabv3", "backbone": "resnet18", "aspp": True})
        == "deeplabv3-resnet18-aspp"
    )
    assert (
        bench.model_label({"arch": "deeplabv3plus", "backbone": "resnet18", "aspp": False})
        == "deeplabv3plus-resnet18-noaspp"
    )


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segtune.bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_models_prints_the_filtered_table(tmp_path: Path) -> None:
    from segtune.models import build_model, model_variants

    wanted = [
        v
        for v in model_variants()
        if (v["arch"], v["backbone"]) == ("deeplabv3", "mobilenet_v3_small")
    ]
    assert wanted, "the registry has no deeplabv3 + mobilenet_v3_small"
    out_csv = tmp_path / "cost.csv"
    result = run_bench(
        "models",
        "--arch", "deeplabv3",
        "--backbone", "mobilenet_v3_small",
        "--input", "64x48",
        "--repeats", "2",
        "--warmup", "1",
        "--threads", "1",
        "--csv", str(out_csv),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    header, columns, rows = lines[0], lines[1].split(), lines[2:]
    assert header.startswith("# torch ") and "input 64x48" in header and " 1 of " in header
    assert "GPU" in header
    assert columns == list(bench.TABLE_COLUMNS)
    labels = [bench.model_label(v) for v in wanted]
    assert sorted(row.split()[0] for row in rows) == sorted(labels)
    assert result.stderr.count(f"/{len(wanted)}] deeplabv3-mobilenet_v3_small") == len(wanted)

    with out_csv.open() as f:
        records = {r["model"]: r for r in csv.DictReader(f)}
    assert sorted(records) == sorted(labels)
    for variant in wanted:
        record = records[bench.model_label(variant)]
        expected = bench.count_params(build_model(variant))
        assert float(record["params_m"]) == pytest.approx(expected)
        assert float(record["infer_ms_cpu"]) > 0
        assert record["bench_input"] == "64x48"
        if NO_GPU:
            assert record["infer_ms_gpu"] == ""
            assert record["gpu_skip_reason"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "1000by750"], "invalid input size '1000by750'"),
        (["--arch", "nosuchnet"], "no model variant matches --arch nosuchnet"),
        (["--threads", "0"], "invalid --threads 0"),
    ],
)
def test_cli_bad_options_give_one_error_line(args: list[str], message: str) -> None:
    result = run_bench("models", *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stdout == ""


def test_engine_overhead_compares_fit_with_a_bare_loop() -> None:
    from segtune.bench import engine_overhead

    result = engine_overhead("deeplabv3", "mobilenet_v3_small", 32, 2, 4, 1, "cpu")
    assert result["bare_img_s"] > 0 and result["engine_img_s"] > 0
    # the same work: a fit() several times slower or faster than the bare loop is a broken one
    assert 0.2 < result["ratio"] < 5
