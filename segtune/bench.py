"""`python -m segtune.bench`: cost tables of the models, the training engine's overhead, and a
load test of the tracking server.

`models` measures every registered architecture x backbone x ASPP variant (untrained weights)
with the cost library (`segtune.models.cost`), without training; `engine` times one `fit()` epoch
against a bare PyTorch loop on the same tensors (`segtune.training.overhead`); `tracking` has many
trials log epochs to one `mlflow server` at once and reads every value back
(`segtune.tracking.server_load`); `sweep` runs a sweep and prints where its time went
(`segtune.sweep.bench`); `loader` prints images/s per loader worker for a sweep's data and
augmentations (`segtune.data.throughput`); `replay` replays search strategies on a finished
sweep's recorded curves (`segtune.sweep.replay`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from segtune.cli import command_parser, run_cli, setup_logging
from segtune.config.names import MODEL_COSTS
from segtune.config.trial import format_hw, parse_hw, trial_config
from segtune.errors import ConfigError
from segtune.models.cost import (
    DEFAULT_INPUT_HW,
    check_count,
    conditions_line,
    cpu_name,
    measure_cost,
    warn_if_busy,
)
from segtune.models.device import AMP_MODES

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("model", *MODEL_COSTS)
PERCENTILES = (("p50", 50), ("p95", 95), ("max", 100))


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
    threads = check_count("--threads", args.threads, 1)
    repeats = check_count("--repeats", args.repeats, 1)
    warmup = check_count("--warmup", args.warmup, 0)
    variants = _select_variants(model_variants(), args.arch, args.backbone)
    gpu = not args.no_gpu
    amp = args.amp  # argparse restricts it to AMP_MODES
    header = conditions_line(input_hw, threads, warmup, repeats, gpu, amp)
    log.info("measuring %d model(s): %s", len(variants), header.lstrip("# "))
    warn_if_busy(threads)
    rows = []
    for i, variant in enumerate(variants, 1):
        started = time.perf_counter()
        cfg = trial_config(variant)
        label = cfg.model_label()
        model = build_model(cfg)
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


def _cmd_sweep(args: argparse.Namespace) -> int:
    from segtune.sweep.bench import bench_sweep, print_bench

    repeats = check_count("--repeats", args.repeats, 1)
    table = bench_sweep(args.sweep, args.set, repeats, args.cold)
    print_bench(table, args.sweep, args.set, args.cold)
    return 0


def _cmd_loader(args: argparse.Namespace) -> int:
    """Images/s per loader worker for each augmentation and crop of a sweep."""
    from segtune.config.sweep import load_sweep
    from segtune.data.throughput import loader_rates, worker_threads
    from segtune.sweep.space import discrete_trials

    images = check_count("--images", args.images, 1)
    repeats = check_count("--repeats", args.repeats, 1)
    warmup = check_count("--warmup", args.warmup, 0)
    sweep = load_sweep(args.sweep, args.set)
    load_before = os.getloadavg()[0]
    rates = loader_rates(sweep.data, discrete_trials(sweep), images, repeats, warmup)
    print(
        f"# {sweep.data.root} | one loader worker process; {worker_threads()} | CPU {cpu_name()}, "
        f"{os.cpu_count()} cores, load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after | "
        f"{images}+ images a run, warmup {warmup}, median of {repeats}"
    )
    print(f"{'augment':<8} {'crop':>5} {'cache':>5} {'img/s per worker':>16} {'spread':>7}")
    for r in rates:
        print(
            f"{r.augment:<8} {r.image_size:>5} {'on' if r.cache else 'off':>5} "
            f"{r.img_s:>16.1f} {r.spread:>7.0%}"
        )
    print(
        "a trial training at R img/s needs about R / (img/s per worker) loader workers "
        "(train.num_workers), each a cpu of tune.resources_per_trial"
    )
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from segtune.sweep.replay import replay_command

    seeds = check_count("--seeds", args.seeds, 1)
    halving = (args.grace_period, args.reduction_factor)
    print(replay_command(args.experiment, args.tracking_uri, args.constraints, args.cost, seeds,
                         halving, args.load, args.export))  # fmt: skip
    return 0


def _cmd_engine(args: argparse.Namespace) -> int:
    from segtune.training.overhead import engine_overhead

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


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """A SIGTERM unwinds like Ctrl-C does, so that the server started here is stopped too."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_tracking(args: argparse.Namespace) -> int:
    """The load test; 1 when a single value is not read back as sent: a sweep's report and its
    scheduler's decisions rest on every epoch's metrics."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from segtune.tracking import address, server, server_load

    loggers = check_count("--loggers", args.loggers, 1)
    epochs = check_count("--epochs", args.epochs, 1)
    if args.tracking_uri and args.workers is not None:
        raise ConfigError("--workers sets the server this command starts; not with --tracking-uri")
    workers = check_count("--workers", 4 if args.workers is None else args.workers, 1)
    with (
        tempfile.TemporaryDirectory(prefix="segtune-load-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        if args.tracking_uri:
            uri = server.check_server_uri(args.tracking_uri)
            backend = "server"
            target = f"running server {uri} (backend, workers: not known here)"
        else:
            store = args.backend_store_uri or f"sqlite:///{Path(tmp) / 'mlflow.db'}"
            backend = server.backend_kind(store)
            stack.enter_context(_sigterm_as_exit())
            uri = stack.enter_context(server.tracking_server(store, Path(tmp), workers)).url
            target = f"mlflow server, workers {workers}, backend {address.public_uri(store)}"
            # the server's settings that decide what it sustains (its connection pool...)
            settings = sorted(k for k in os.environ if k.startswith(server.SERVER_SETTINGS))
            target += "".join(f", {k}={os.environ[k]}" for k in settings)
        # MLflow prints each finished run's link; the runs are closed as trials close them
        # (the same requests), and stdout keeps the table alone
        load_before = os.getloadavg()[0]
        with contextlib.redirect_stdout(io.StringIO()):
            result = server_load.run_load(uri, loggers, epochs, args.experiment, args.seed)
        started = time.perf_counter()
        check = server_load.verify(MlflowClient(uri), result.expected, result.failed)
        read_s = time.perf_counter() - started
    if result.errors:
        log.warning("%d call(s) failed; first: %s", len(result.errors), result.errors[0])
    ms = [1000 * t for t in result.latencies_s]
    print(
        f"# {os.cpu_count()} CPUs ({cpu_name()}), load {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after | "
        f"mlflow {mlflow.__version__}, Python {platform.python_version()} | {target} | "
        f"loggers: threads of one process, client CPU {statistics.fmean(result.client_cpu_s) * 1000:.2f} "
        f"ms a call | runs opened in {result.open_s:.1f} s, read back in {read_s:.1f} s"
    )
    import pandas as pd  # only the table needs pandas

    row = {"backend": backend, "loggers": loggers, "epochs": epochs,
           "values logged": result.values, "values read back": check.matched}  # fmt: skip
    row |= {f"{name} ms": f"{server_load.percentile(ms, q):.1f}" for name, q in PERCENTILES}
    row |= {"total s": f"{result.wall_s:.1f}", "values/s": f"{result.values / result.wall_s:.0f}"}
    print(pd.DataFrame([row]).to_string(index=False))
    if not check.ok:
        print(f"error: {check.summary()}", file=sys.stderr)
        for examples in check.examples.values():
            for example in examples:
                print(f"  {example}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "python -m segtune.bench",
        "Cost of segmentation models (parameters, size, FLOPs, CPU and GPU latency), the "
        "training engine's overhead, the tracking server under load, a sweep's time account.",
    )
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
    loader = sub.add_parser(
        "loader",
        help="images/s per loader worker for each augmentation and crop of a sweep",
        description="Read the sweep's training data through one loader worker with each "
        "augmentation and crop (image_size) of its search space, the cache as the sweep sets "
        "it, and print images/s: size resources_per_trial.cpu and num_workers from it.",
    )
    loader.add_argument("sweep", type=Path, help="sweep YAML file, e.g. sweeps/hpo.yaml")
    loader.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    loader.add_argument("--images", type=int, default=256, help="a run's images (default 256)")
    loader.add_argument("--repeats", type=int, default=3, help="timed runs, median (default 3)")
    loader.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    loader.set_defaults(func=_cmd_loader)
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
    tracking = sub.add_parser(
        "tracking",
        help="load test of an MLflow tracking server: concurrent trial loggers, all read back",
        description="Start an mlflow server on 127.0.0.1 (or use --tracking-uri), have LOGGERS "
        "trials log EPOCHS epochs of the per-epoch metrics at once, time each epoch's logging, "
        "read every value back; exit 1 if any is lost.",
    )
    target = tracking.add_mutually_exclusive_group()
    target.add_argument(
        "--backend-store-uri",
        metavar="URI",
        help="the server's store: sqlite:///FILE, postgresql://..., mysql://... "
        "(default: a sqlite file in a temporary folder)",
    )
    target.add_argument(
        "--tracking-uri", metavar="URL", help="use this running server instead of starting one"
    )
    tracking.add_argument("--loggers", type=int, default=64, help="concurrent trials (default 64)")
    tracking.add_argument("--epochs", type=int, default=50, help="epochs a trial (default 50)")
    tracking.add_argument("--workers", type=int, help="server worker processes (default 4)")
    tracking.add_argument("--experiment", default="segtune-load", help="(default %(default)s)")
    tracking.add_argument("--seed", type=int, default=0, help="of the random metric values")
    tracking.set_defaults(func=_cmd_tracking)
    sweep = sub.add_parser(
        "sweep",
        help="run a sweep as a user would and print where its time went, median of --repeats",
        description="Run python -m segtune.run SWEEP (in a temporary tracking store) --repeats "
        "times and print each run's time account: efficiency, driver and trial stages.",
    )
    sweep.add_argument("sweep", type=Path, help="sweep YAML file, e.g. sweeps/quickstart.yaml")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    sweep.add_argument("--repeats", type=int, default=3, help="timed runs (default 3)")
    sweep.add_argument(
        "--cold", action="store_true", help="an empty cost table each run (a first sweep)"
    )
    sweep.set_defaults(func=_cmd_sweep)
    replay = sub.add_parser(
        "replay",
        help="replay grid, random, ASHA and MO-ASHA on a finished sweep's curves, no training",
        description="Read a finished sweep's val_miou curves and costs from MLflow and replay "
        "each strategy (10 seeds) at 25/50/100%% of the grid's trial-epochs, with and without "
        "constraints: trial-epochs spent, best mIoU, share of the grid's hypervolume.",
    )
    replay.add_argument("--experiment", metavar="NAME", help="the sweep's MLflow experiment")
    replay.add_argument("--tracking-uri", metavar="URI", help="(default: MLFLOW_TRACKING_URI)")
    replay.add_argument(
        "--constraints", metavar="TEXT", help="e.g. 'size_mb<=5' (default: the sweep's own)"
    )
    replay.add_argument("--cost", help="the fronts' cost (default: the sweep's, else infer_ms_cpu)")
    replay.add_argument("--seeds", type=int, default=10, help="orders drawn (default 10)")
    replay.add_argument("--grace-period", type=int, help="(default: the sweep file's)")
    replay.add_argument("--reduction-factor", type=float, help="(default: the sweep file's)")
    replay.add_argument("--load", type=Path, metavar="FILE", help="first write this recording")
    replay.add_argument("--export", type=Path, metavar="FILE", help="keep the recording as JSON")
    replay.set_defaults(func=_cmd_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
