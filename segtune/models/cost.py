"""Cost of a model, the study's Task 3 axes: parameters, size, FLOPs, CPU and GPU latency.

Conventions (docs/design.md, "Cost measurement"):

* Latency is batch 1 at the study's image size, 1x3x750x1000 (written ``1000x750``, W x H, as the
  study does), in eval mode under ``torch.inference_mode()``, warm-up runs first, then the median of
  the timed runs. CPU runs use a fixed, recorded thread count; GPU runs are synchronised with CUDA
  events and skipped, with the reason recorded, when no GPU is usable: a GPU number is never
  invented, its key is simply absent.
* ``size_mb`` is the byte count of ``torch.save(model.state_dict())`` (buffers such as BatchNorm
  statistics included) with MB = 1e6 bytes, so it matches the checkpoint file on disk.
* ``params_m`` is the parameter count in millions (1e6).
* ``gflops`` is ``torch.utils.flop_counter.FlopCounterMode``'s total for one image divided by 1e9.
  That counter counts a multiply-add as 2 FLOPs and only counts matrix products and convolutions
  (not bias, normalisation, activations or interpolation), so it is the usual "2 x MACs" figure.

Every function works on a copy of the model, so the caller's model keeps its weights, mode
(train/eval), device and memory format. Every trial measures its best weights with
`measure_cost`; ``python -m segtune.bench models`` prints the same figures for every variant.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypedDict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segtune.config.trial import check_hw, format_hw
from segtune.errors import ConfigError
from segtune.models import example_input
from segtune.models.device import amp_dtype, check_amp

log = logging.getLogger(__name__)

DEFAULT_INPUT_HW = (750, 1000)  # (H, W) of the study's images, 1000x750 as W x H
GPU_WARMUP, GPU_REPEATS = 5, 20  # GPU runs are cheap: more of them steady the median
MB = 1e6  # bytes per MB: decimal, so size_mb is the checkpoint's file size / 1e6


class Cost(TypedDict, total=False):
    """What `measure_cost` returns: the MODEL_COSTS metrics (segtune.config.names) and the
    conditions they hold for.

    `infer_ms_gpu`, `gpu_name`, `bench_gpu_repeats` and `bench_gpu_precision` are present only
    when the GPU was measured; otherwise `gpu_skip_reason` says why not. All other keys are always
    present.
    """

    params_m: float
    size_mb: float
    gflops: float
    infer_ms_cpu: float
    infer_ms_gpu: float
    bench_input: str  # W x H, e.g. "1000x750"
    bench_threads: int
    bench_warmup: int
    bench_repeats: int
    bench_gpu_repeats: int
    bench_gpu_precision: str  # float32 | bfloat16 | float16
    cpu_name: str
    gpu_name: str
    gpu_skip_reason: str
    torch_version: str
    # how steady the CPU was (segtune.sweep.cost_stage): spread of the timed runs, cores that other
    # processes used meanwhile, load averages, tries, and why the figure is noisy if it is
    cpu_cv: float
    other_cores: float
    load_before: float
    load_after: float
    cpu_attempts: int
    noisy: str
    signature: str  # the architecture signature the cost table keeps it under
    source: str  # "measured" by the cost stage, the cost run it reused, or "trial"


def check_count(name: str, value: int, minimum: int) -> int:
    """A whole number of runs or threads, at least `minimum`."""
    if int(value) != value or value < minimum:
        raise ConfigError(f"invalid {name} {value!r}: must be an integer >= {minimum}")
    return int(value)


# ----------------------------------------------------------------------------- helpers


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _copy_to(
    model: nn.Module,
    device: torch.device | str,
    *,
    train: bool = False,
    channels_last: bool = False,
) -> nn.Module:
    """A float32 copy on `device`: converting in place would change the caller's model."""
    clone = copy.deepcopy(model).to(device=device, dtype=torch.float32)
    if channels_last:
        clone = clone.to(memory_format=torch.channels_last)
    return clone.train(train)


def cpu_name() -> str:
    """The CPU model, recorded with every CPU latency because it decides the number."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_skip_reason() -> str | None:
    """Why no GPU latency can be measured here, or None when a CUDA device is usable."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    try:
        if not torch.cuda.is_available():
            return "no CUDA device available (torch.cuda.is_available() is False)"
        torch.cuda.init()
    except (RuntimeError, AssertionError) as exc:
        return f"CUDA cannot be initialised: {exc}"
    return None


@contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _cudnn_benchmark() -> Iterator[None]:
    """Let cuDNN pick its fastest kernels during warm-up, as a deployed model would."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


# ----------------------------------------------------------------------------- static costs


def count_params(model: nn.Module) -> float:
    """Parameters in millions (shared parameters counted once, as `parameters()` yields them)."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def state_dict_mb(model: nn.Module) -> float:
    """Bytes of the serialised state dict in MB (1e6 bytes): what a checkpoint costs on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / MB


def gflops(model: nn.Module, input_hw: Sequence[int] = DEFAULT_INPUT_HW) -> float:
    """FLOPs of one forward pass on one 3-channel image of `input_hw` (H, W), in units of 1e9.

    Counted by `FlopCounterMode` on the model's own device: a multiply-add is 2 FLOPs, and only
    matrix products and convolutions are counted.
    """
    input_hw = check_hw(input_hw)
    device = _model_device(model)
    clone = _copy_to(model, device)
    x = example_input(input_hw, device=device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        clone(x)
    return counter.get_total_flops() / 1e9


# ----------------------------------------------------------------------------- latency


def cpu_latency_ms(
    model: nn.Module,
    input_hw: Sequence[int] = DEFAULT_INPUT_HW,
    threads: int = 2,
    warmup: int = 2,
    repeats: int = 5,
) -> float:
    """Median wall time in ms of a batch-1 forward pass on the CPU with `threads` intra-op threads.

    The previous thread count is restored afterwards, so a trial's own threading is untouched.
    """
    return statistics.median(cpu_latency_runs(model, input_hw, threads, warmup, repeats))


def cpu_latency_runs(
    model: nn.Module,
    input_hw: Sequence[int] = DEFAULT_INPUT_HW,
    threads: int = 2,
    warmup: int = 2,
    repeats: int = 5,
) -> list[float]:
    """The ms of each timed run of `cpu_latency_ms`: their spread says how steady the CPU was."""
    input_hw = check_hw(input_hw)
    threads = check_count("threads", threads, 1)
    warmup = check_count("warmup", warmup, 0)
    repeats = check_count("repeats", repeats, 1)
    clone = _copy_to(model, "cpu")
    x = example_input(input_hw)
    times: list[float] = []
    with _num_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            clone(x)
        for _ in range(repeats):
            start = time.perf_counter()
            clone(x)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def gpu_latency_ms(
    model: nn.Module,
    input_hw: Sequence[int] = DEFAULT_INPUT_HW,
    warmup: int = GPU_WARMUP,
    repeats: int = GPU_REPEATS,
    amp: str = "off",
) -> tuple[float | None, str | None]:
    """Median ms of a batch-1 forward pass on the current CUDA device, timed with CUDA events.

    Returns ``(ms, None)``, or ``(None, reason)`` when no GPU is usable. The copy runs in
    channels_last under autocast per `amp` (`off`: float32, the default because batch-1 latency of
    small models is launch-bound and autocast's casts make it slower; `auto`: bfloat16 where
    supported, else float16); `gpu_precision(amp)` names the dtype that was used.
    """
    input_hw = check_hw(input_hw)
    warmup = check_count("warmup", warmup, 0)
    repeats = check_count("repeats", repeats, 1)
    check_amp(amp)
    reason = gpu_skip_reason()
    if reason is not None:
        return None, reason
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = amp_dtype(amp, device)
    clone = _copy_to(model, device, channels_last=True)
    x = example_input(input_hw, device=device, channels_last=True)
    times: list[float] = []
    with (
        _cudnn_benchmark(),
        torch.inference_mode(),
        torch.autocast("cuda", dtype=dtype, enabled=dtype is not None),
    ):
        for _ in range(warmup):
            clone(x)
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            clone(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    del clone, x
    torch.cuda.empty_cache()
    return statistics.median(times), None


def gpu_precision(amp: str) -> str:
    """The dtype name `gpu_latency_ms(amp=amp)` runs at on this machine's GPU."""
    dtype = amp_dtype(amp, torch.device("cuda"))
    return str(dtype or torch.float32).removeprefix("torch.")


def static_cost(model: nn.Module, input_hw: Sequence[int] = DEFAULT_INPUT_HW) -> Cost:
    """The costs that no clock decides (parameters, size, FLOPs) and the machine they hold for."""
    input_hw = check_hw(input_hw)
    return Cost(
        params_m=count_params(model),
        size_mb=state_dict_mb(model),
        gflops=gflops(model, input_hw),
        bench_input=format_hw(input_hw),
        cpu_name=cpu_name(),
        torch_version=torch.__version__,
    )


def gpu_cost(
    model: nn.Module,
    input_hw: Sequence[int] = DEFAULT_INPUT_HW,
    warmup: int = GPU_WARMUP,
    repeats: int = GPU_REPEATS,
    amp: str = "off",
) -> Cost:
    """`infer_ms_gpu` with the GPU's name and precision, or `gpu_skip_reason` alone."""
    ms, reason = gpu_latency_ms(model, input_hw, warmup, repeats, amp)
    if ms is None:
        return Cost(gpu_skip_reason=reason or "unknown")
    return Cost(
        infer_ms_gpu=ms,
        gpu_name=torch.cuda.get_device_name(torch.cuda.current_device()),
        bench_gpu_repeats=repeats,
        bench_gpu_precision=gpu_precision(amp),
    )


def measure_cost(
    model: nn.Module,
    input_hw: Sequence[int] = DEFAULT_INPUT_HW,
    threads: int = 2,
    repeats: int = 5,
    warmup: int = 2,
    gpu: bool = True,
    gpu_repeats: int = GPU_REPEATS,
    gpu_warmup: int = GPU_WARMUP,
    amp: str = "off",
) -> Cost:
    """All inference costs of `model` at `input_hw` (H, W), with the conditions they were taken in.

    `gpu=False` skips the GPU (its reason says so). The caller's model is left as it was.
    """
    cost = static_cost(model, input_hw)
    cost.update(
        infer_ms_cpu=cpu_latency_ms(model, input_hw, threads, warmup, repeats),
        bench_threads=threads,
        bench_warmup=warmup,
        bench_repeats=repeats,
    )
    if not gpu:
        cost["gpu_skip_reason"] = "GPU measurement disabled (gpu=False / --no-gpu)"
        return cost
    cost.update(gpu_cost(model, input_hw, gpu_warmup, gpu_repeats, amp))
    return cost


def conditions_line(
    input_hw: Sequence[int], threads: int, warmup: int, repeats: int, gpu: bool, amp: str = "off"
) -> str:
    """One line recording what the table's numbers depend on."""
    if not gpu:
        gpu_text = "skipped (--no-gpu)"
    elif (reason := gpu_skip_reason()) is not None:
        gpu_text = f"skipped ({reason})"
    else:
        name = torch.cuda.get_device_name(torch.cuda.current_device())
        gpu_text = f"{name}, {gpu_precision(amp)}, warmup {GPU_WARMUP}, median of {GPU_REPEATS}"
    return (
        f"# torch {torch.__version__} | input {format_hw(input_hw)} (W x H, batch 1) | "
        f"CPU {cpu_name()}, {threads} of {os.cpu_count()} threads, load {os.getloadavg()[0]:.1f} | "
        f"warmup {warmup}, median of {repeats} | GPU {gpu_text}"
    )


def warn_if_busy(threads: int) -> None:
    """Other processes on the benchmark's cores inflate CPU latency many times (threads spin).

    The 1-minute load average lags, so this is a hint, not a verdict; the header records it.
    """
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load + threads > cores + 0.75:
        log.warning(
            "load average %.1f with %d threads on %d cores: other processes may compete for the "
            "CPU and inflate CPU latencies; rerun on an idle machine or use fewer --threads",
            load,
            threads,
            cores,
        )
