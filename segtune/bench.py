"""Cost of a model, the seed's Task 3 axes: parameters, size, FLOPs, CPU and GPU latency, throughput.

Conventions (DESIGN.md "Cost measurement"):

* Latency is batch 1 at the seed's image size, 1x3x750x1000 (written ``1000x750``, W x H, as the
  seed does), in eval mode under ``torch.inference_mode()``, warm-up runs first, then the median of
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
(train/eval), device and memory format.

Command line: ``python -m segtune.bench models`` prints the cost table of every registered
architecture x backbone x ASPP variant, without training.
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypedDict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segtune.cli import run_cli, setup_logging
from segtune.config import check_hw, format_hw, parse_hw, trial_config
from segtune.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_INPUT_HW = (750, 1000)  # (H, W) of the seed's images, 1000x750 as W x H
GPU_WARMUP, GPU_REPEATS = 5, 20  # GPU runs are cheap: more of them steady the median
MB = 1e6  # bytes per MB: decimal, so size_mb is the checkpoint's file size / 1e6
AMP_MODES = ("auto", "off", "bf16", "fp16")  # the values of TrialConfig.amp
METRIC_KEYS = ("params_m", "size_mb", "gflops", "infer_ms_cpu", "infer_ms_gpu")
TABLE_COLUMNS = ("model", *METRIC_KEYS)


class Cost(TypedDict, total=False):
    """What `measure_cost` returns: the DESIGN.md final metrics plus the conditions they hold for.

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


# ----------------------------------------------------------------------------- parsing


def _check_count(name: str, value: int, minimum: int) -> int:
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


def _random_input(
    batch: int, input_hw: tuple[int, int], device: torch.device | str, channels_last: bool = False
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *input_hw, generator=generator).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _check_amp(amp: str) -> str:
    if amp not in AMP_MODES:
        raise ConfigError(f"invalid amp {amp!r}: expected one of {', '.join(AMP_MODES)}")
    return amp


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device`; None means float32.

    CPU runs are always float32: CPU autocast is slower than float32 on most CPUs, and the CPU
    latency is the deployment figure of the seed.
    """
    if _check_amp(amp) == "off" or device.type != "cuda":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


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
    x = _random_input(1, input_hw, device)
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
    input_hw = check_hw(input_hw)
    threads = _check_count("threads", threads, 1)
    warmup = _check_count("warmup", warmup, 0)
    repeats = _check_count("repeats", repeats, 1)
    clone = _copy_to(model, "cpu")
    x = _random_input(1, input_hw, "cpu")
    times: list[float] = []
    with _num_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            clone(x)
        for _ in range(repeats):
            start = time.perf_counter()
            clone(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
    warmup = _check_count("warmup", warmup, 0)
    repeats = _check_count("repeats", repeats, 1)
    _check_amp(amp)
    reason = gpu_skip_reason()
    if reason is not None:
        return None, reason
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = _autocast_dtype(amp, device)
    clone = _copy_to(model, device, channels_last=True)
    x = _random_input(1, input_hw, device, channels_last=True)
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
    dtype = _autocast_dtype(amp, torch.device("cuda"))
    return str(dtype or torch.float32).removeprefix("torch.")


# ----------------------------------------------------------------------------- throughput


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
    input_hw = check_hw(input_hw)
    cost = Cost(
        params_m=count_params(model),
        size_mb=state_dict_mb(model),
        gflops=gflops(model, input_hw),
        infer_ms_cpu=cpu_latency_ms(model, input_hw, threads, warmup, repeats),
        bench_input=format_hw(input_hw),
        bench_threads=threads,
        bench_warmup=warmup,
        bench_repeats=repeats,
        cpu_name=cpu_name(),
        torch_version=torch.__version__,
    )
    if not gpu:
        cost["gpu_skip_reason"] = "GPU measurement disabled (gpu=False / --no-gpu)"
        return cost
    ms, reason = gpu_latency_ms(model, input_hw, gpu_warmup, gpu_repeats, amp)
    if ms is None:
        cost["gpu_skip_reason"] = reason or "unknown"
    else:
        cost["infer_ms_gpu"] = ms
        cost["gpu_name"] = torch.cuda.get_device_name(torch.cuda.current_device())
        cost["bench_gpu_repeats"] = gpu_repeats
        cost["bench_gpu_precision"] = gpu_precision(amp)
    return cost


def model_label(variant: Mapping[str, object]) -> str:
    """`TrialConfig.label()` without the augmentation suffix: `deeplabv3-resnet18-aspp`, `unet-none`."""
    return trial_config(variant).label().rsplit("-", 1)[0]


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


def _warn_if_busy(threads: int) -> None:
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


# ----------------------------------------------------------------------------- command line


def _select_variants(
    variants: list[dict], archs: Sequence[str] | None, backbones: Sequence[str] | None
) -> list[dict]:
    selected = [
        v
        for v in variants
        if (not archs or v["arch"] in archs) and (not backbones or v["backbone"] in backbones)
    ]
    if not selected:
        known_archs = sorted({v["arch"] for v in variants})
        known_backbones = sorted({v["backbone"] for v in variants})
        raise ConfigError(
            f"no model variant matches --arch {' '.join(archs or ['*'])} "
            f"--backbone {' '.join(backbones or ['*'])}; architectures: {', '.join(known_archs)}; "
            f"backbones: {', '.join(known_backbones)}"
        )
    return selected


def _cmd_models(args: argparse.Namespace) -> int:
    import pandas as pd  # only the table needs pandas

    from segtune.models import build_model, model_variants

    input_hw = parse_hw(args.input)
    threads = _check_count("--threads", args.threads, 1)
    repeats = _check_count("--repeats", args.repeats, 1)
    warmup = _check_count("--warmup", args.warmup, 0)
    variants = _select_variants(model_variants(), args.arch, args.backbone)
    gpu = not args.no_gpu
    amp = args.amp  # argparse restricts it to AMP_MODES
    header = conditions_line(input_hw, threads, warmup, repeats, gpu, amp)
    log.info("measuring %d model(s): %s", len(variants), header.lstrip("# "))
    _warn_if_busy(threads)
    rows = []
    for i, variant in enumerate(variants, 1):
        label = model_label(variant)
        started = time.perf_counter()
        model = build_model(trial_config(variant))
        cost = measure_cost(model, input_hw, threads, repeats, warmup, gpu=gpu, amp=amp)
        rows.append({"model": label, **cost})
        log.info(
            "[%d/%d] %s: %.2f M params, %.1f MB, %.1f GFLOPs, CPU %.1f ms%s (%.0f s)",
            i,
            len(variants),
            label,
            cost["params_m"],
            cost["size_mb"],
            cost["gflops"],
            cost["infer_ms_cpu"],
            f", GPU {cost['infer_ms_gpu']:.2f} ms" if "infer_ms_gpu" in cost else "",
            time.perf_counter() - started,
        )
        del model
    frame = pd.DataFrame(rows)
    # The metric columns come first and always exist (empty where not measured, e.g. no GPU).
    extra = [c for c in frame.columns if c not in TABLE_COLUMNS]
    frame = frame.reindex(columns=[*TABLE_COLUMNS, *extra])
    if args.csv is not None:
        try:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(args.csv, index=False)
        except OSError as exc:
            raise ConfigError(f"cannot write --csv {args.csv}: {exc.strerror or exc}") from None
        log.info("wrote %s", args.csv)
    print(header)
    print(
        frame[list(TABLE_COLUMNS)].to_string(index=False, float_format="{:.2f}".format, na_rep="-")
    )
    return 0


class _TensorDataset(torch.utils.data.Dataset):
    """Pre-built tensors in the dataset's `{"image", "mask", "id"}` form: no decoding, no augmentation."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, object]:
        index = key[0] if isinstance(key, tuple) else key
        return {"image": self.images[index], "mask": self.masks[index], "id": str(index)}


def engine_overhead(
    arch: str, backbone: str, size: int, batch: int, images: int, repeats: int, device: str
) -> dict[str, float]:
    """Images/s of one `fit()` epoch against a bare PyTorch loop on the same model and tensors.

    Both train the same architecture from the same initial weights on the same pre-built
    tensors, in alternation, `repeats` times; the medians and their ratio are returned.
    """
    import torch.nn.functional as F

    from segtune.config import trial_config
    from segtune.data.classes import IGNORE_INDEX, NUM_CLASSES
    from segtune.data.loader import make_loader
    from segtune.engine import fit, resolve_device
    from segtune.losses import build_loss
    from segtune.models import build_model

    dev = resolve_device(device)
    cfg = trial_config(
        {
            "arch": arch,
            "backbone": backbone,
            "batch_size": batch,
            "epochs": 1,
            "scheduler": "none",
            "image_size": size,
            "amp": "off",
        }
    )
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(images, 3, size, size, generator=generator)
    ys = torch.randint(0, NUM_CLASSES, (images, size, size), generator=generator)
    dataset = _TensorDataset(xs, ys)
    train = make_loader(dataset, batch, shuffle=True, drop_last=True)
    val = make_loader(_TensorDataset(xs[:batch], ys[:batch]), batch, shuffle=False)
    torch.manual_seed(0)
    initial = build_model(cfg).state_dict()
    # host tensors, moved per step as fit() must; pinned as its loader pins them on CUDA
    batches = [(xs[i : i + batch], ys[i : i + batch]) for i in range(0, images - batch + 1, batch)]
    if dev.type == "cuda":
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]

    def bare() -> float:
        model = build_model(cfg).to(dev)
        model.load_state_dict(initial)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        _sync(dev)
        started = time.perf_counter()
        for x_host, y_host in batches:
            x, y = x_host.to(dev, non_blocking=True), y_host.to(dev, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)
            loss.backward()
            optimizer.step()
        _sync(dev)
        return len(batches) * batch / (time.perf_counter() - started)

    def engine() -> float:
        model = build_model(cfg)
        model.load_state_dict(initial)
        result = fit(model, train, val, cfg, build_loss("ce"), device=dev)
        return result.history[0]["train_img_s"]

    bare_runs, engine_runs = [], []
    bare()  # warm-up: allocator, kernels, thread pools
    for _ in range(repeats):
        bare_runs.append(bare())
        engine_runs.append(engine())
    return {
        "bare_img_s": statistics.median(bare_runs),
        "engine_img_s": statistics.median(engine_runs),
        "ratio": statistics.median(engine_runs) / statistics.median(bare_runs),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cmd_engine(args: argparse.Namespace) -> int:
    result = engine_overhead(
        args.arch, args.backbone, args.size, args.batch, args.images, args.repeats, args.device
    )
    print(
        f"{args.arch}-{args.backbone}, {args.size}px, batch {args.batch}, {args.images} images, "
        f"device {args.device}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(
        f"bare loop {result['bare_img_s']:.1f} img/s, fit() {result['engine_img_s']:.1f} img/s, "
        f"ratio {result['ratio']:.3f}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segtune.bench",
        description="Cost of segmentation models: parameters, size, FLOPs, CPU and GPU latency.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser(
        "models",
        help="cost table of every architecture x backbone x ASPP variant, without training",
        description="Measure every registered model variant (untrained weights) and print a table.",
    )
    models.add_argument(
        "--input", default=format_hw(DEFAULT_INPUT_HW), help="WIDTHxHEIGHT (default %(default)s)"
    )
    models.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    models.add_argument("--repeats", type=int, default=5, help="timed runs, median (default 5)")
    models.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    models.add_argument("--arch", nargs="+", metavar="ARCH", help="only these architectures")
    models.add_argument("--backbone", nargs="+", metavar="NAME", help="only these backbones")
    models.add_argument("--csv", type=Path, metavar="FILE", help="also write every column as CSV")
    models.add_argument("--no-gpu", action="store_true", help="skip the GPU latency")
    models.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="off",
        help="GPU autocast: off = float32 (default), auto = bfloat16 where supported",
    )
    models.set_defaults(func=_cmd_models)
    engine = sub.add_parser(
        "engine",
        help="images/s of fit() against a bare PyTorch loop (the engine's overhead)",
        description="Train one epoch with fit() and with a ten-line loop on the same tensors.",
    )
    engine.add_argument("--arch", default="deeplabv3")
    engine.add_argument("--backbone", default="resnet18")
    engine.add_argument("--size", type=int, default=128, help="square input side (default 128)")
    engine.add_argument("--batch", type=int, default=8)
    engine.add_argument("--images", type=int, default=64, help="images per epoch (default 64)")
    engine.add_argument("--repeats", type=int, default=3, help="alternating runs (default 3)")
    engine.add_argument("--device", default="auto", help="auto | cpu | cuda")
    engine.set_defaults(func=_cmd_engine)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
