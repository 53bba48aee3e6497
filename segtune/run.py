"""`python -m segtune.run SWEEP.yaml`: a sweep on Ray Tune, every trial recorded in MLflow.

Order of work: validate the sweep file completely (exit 2 on any problem, before Ray or MLflow
start), pre-flight (dataset, pretrained weights, schedulable resources), then one parent MLflow
run and a Tuner; at the end a summary table, the report (`python -m dashboards.report`, run as
its own command), and exit 1 if any trial failed.

The report's process starts first, at the lowest CPU priority: its imports (about 3 s of CPU) take
what the driver, Ray's start and the trials leave idle. The driver waits for them to end only
before its cost stage times a network; the report draws once it reads the sweep run's id.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from segtune.cli import command_parser, process_age, run_cli, setup_logging
from segtune.config.names import COLUMNS, OBJECTIVE, PARETO_COSTS
from segtune.config.sweep import SweepConfig, load_sweep
from segtune.errors import ConfigError, ModelError, problems_message
from segtune.sweep.report_process import EarlyReport
from segtune.sweep.signals import StopSignals, SweepInterrupted
from segtune.sweep.storage import RunStorage

if TYPE_CHECKING:
    import pandas as pd

    from segtune.data.pipeline import Scan

log = logging.getLogger("segtune.run")


def _parser() -> argparse.ArgumentParser:
    p = command_parser("python -m segtune.run", __doc__, tracking=True)
    p.add_argument("sweep", help="sweep YAML file, e.g. sweeps/task3.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a sweep value, e.g. --set train.epochs=2 (repeatable)",
    )
    p.add_argument("--address", help="join a running Ray cluster: auto or HOST:PORT")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument(
        "--accept-changes",
        action="store_true",
        help="with --resume: run the trials an edited sweep file adds (refused otherwise)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the trials or space and exit")
    p.add_argument("--no-report", action="store_true", help="skip the dashboard report")
    return p


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this sweep: this interpreter, the same file, overrides, store,
    cluster and flags."""
    words = [sys.executable, "-m", "segtune.run", args.sweep, "--resume"]
    words += ["--accept-changes"] * args.accept_changes  # harmless once the edits are the sweep's
    for item in args.set:
        words += ["--set", item]
    if args.tracking_uri:
        words += ["--tracking-uri", args.tracking_uri]
    if args.address:
        words += ["--address", args.address]
    words += ["--no-report"] * args.no_report + ["--verbose"] * args.verbose
    return shlex.join(words)


def absolute_paths(sweep: SweepConfig, tracking_uri: str) -> tuple[SweepConfig, str]:
    """Trials run in Ray's own working directories: make every local path absolute (a storage
    URI stays as it is)."""
    data = sweep.data.model_copy(update={"root": str(Path(sweep.data.root).resolve())})
    storage = RunStorage.of(sweep.tune.storage_path, sweep.tune.storage_endpoint)
    tune = sweep.tune.model_copy(update={"storage_path": storage.location})
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        tracking_uri = "sqlite:///" + str(Path(tracking_uri[len("sqlite:///") :]).resolve())
    return sweep.model_copy(update={"data": data, "tune": tune}), tracking_uri


def dry_run(sweep: SweepConfig) -> None:
    import pandas as pd

    from segtune.sweep.space import describe, discrete_trials

    print(f"sweep {sweep.name}: search {sweep.tune.search}, scheduler {sweep.tune.scheduler}")
    if sweep.tune.search == "grid":
        trials = discrete_trials(sweep)
        rows = []
        for cfg in trials:
            row = {"label": cfg.label()}
            row.update(
                {k: getattr(cfg, k) for k in ("seed", "epochs", "lr", "batch_size", "image_size")}
            )
            rows.append(row)
        table = pd.DataFrame(rows)
        print(table.to_string(index=False))
        print(f"{len(trials)} trials x num_samples {sweep.tune.num_samples}")
    else:
        print("\n".join(describe(sweep)))
        print(f"num_samples: {sweep.tune.num_samples}")


def preflight(sweep: SweepConfig, local: bool) -> Scan:
    """Fail before any trial on what would fail every trial; returns the checked dataset, which
    every trial then reads instead of checking it again."""
    from segtune.data.pipeline import scan_dataset
    from segtune.models import pretrained_weights_file
    from segtune.sweep.space import check_combinations, discrete_trials

    check_combinations(sweep)
    missing: dict[str, None] = {}
    for cfg in discrete_trials(sweep):
        if cfg.pretrained == "imagenet":
            path = pretrained_weights_file(cfg.backbone)
            if not path.is_file():
                missing[f"{cfg.backbone}: {path}"] = None
        elif cfg.pretrained != "none" and not Path(cfg.pretrained).is_file():
            missing[f"pretrained: {cfg.pretrained} (no such file)"] = None
    if missing:
        head = ("pretrained weights missing (place the torchvision files in $TORCH_HOME/hub/"
                "checkpoints, or run with --set train.pretrained=none)")  # fmt: skip
        raise ModelError(problems_message(head, list(missing)))
    gpu = sweep.tune.resources_per_trial.gpu
    if local and gpu > 0:
        import torch

        if torch.cuda.device_count() == 0:
            raise ConfigError(
                f"tune.resources_per_trial.gpu: {gpu} asked, but this machine has no GPU; "
                "set it to 0 (--set tune.resources_per_trial.gpu=0) or join a GPU cluster "
                "with --address"
            )
    return scan_dataset(sweep.data, progress=True)  # generates a synthetic set, checks every pair


# what the driver imports while Ray starts: the pre-flight's modules, the Tuner and the trainable,
# and MLflow's SQL store (1.2 s, else at the cost stage's first look-up)
PREFLIGHT_IMPORTS = (
    "segtune.training.baseline",
    "segtune.data.pipeline",
    "segtune.models",
    "segtune.sweep.space",
    "segtune.sweep.driver",
    "mlflow.store.tracking.sqlalchemy_store",
)


def _checked(sweep: SweepConfig, local: bool) -> tuple[Scan, float]:
    """The pre-flight with the driver's heavy imports (PREFLIGHT_IMPORTS), run in a thread while
    Ray starts: the checked dataset and its colour-only floor."""
    for name in PREFLIGHT_IMPORTS:
        importlib.import_module(name)
    from segtune.data.pipeline import split_samples
    from segtune.training.baseline import colour_floor

    scan = preflight(sweep, local)
    train, val, _ = split_samples(sweep.data, int(sweep.train.get("seed", 0)), scan=scan)
    floor = colour_floor(train, val, sweep.data.rgb_masks)["miou"]
    return scan, floor


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.accept_changes and not args.resume:
        raise ConfigError(
            "--accept-changes: only with --resume, for a started sweep whose file was edited; "
            "a new sweep runs its file as it is"
        )
    sweep = load_sweep(args.sweep, args.set)
    if args.dry_run:
        from segtune.sweep.space import check_combinations

        check_combinations(sweep)
        dry_run(sweep)
        return 0
    uri = args.tracking_uri or sweep.mlflow.tracking_uri
    report = None if args.no_report else EarlyReport(sweep.experiment, uri)
    with report or contextlib.nullcontext():
        return _sweep(args, sweep, report)


def _sweep(args: argparse.Namespace, sweep: SweepConfig, report: EarlyReport | None) -> int:
    """Checks, the sweep, its summary, the report and the time account; the exit status."""
    import ray

    from segtune.sweep.edits import check_edits, sweep_text
    from segtune.sweep.ray_init import check_head, start_ray
    from segtune.tracking.address import check_tracking_uri, resolve_tracking_uri
    from segtune.tracking.outage import use_driver_retries

    sweep, tracking_uri = absolute_paths(
        sweep, resolve_tracking_uri(args.tracking_uri or sweep.mlflow.tracking_uri)
    )
    edits = check_edits(sweep, args.accept_changes) if args.resume else None  # before Ray
    check_tracking_uri(tracking_uri)  # seconds, not the minutes of MLflow's retries
    check_head(args.address)  # seconds, not Ray's minute of retries
    use_driver_retries(tracking_uri, sweep.mlflow.outage_s)
    phases = {"checks_s": process_age()}
    started = time.perf_counter()
    with StopSignals() as stop, ThreadPoolExecutor(1, "pre-flight") as pool:
        try:
            try:  # Ray starts in this thread while the pool's imports and checks what it needs
                checked = pool.submit(_checked, sweep, args.address is None)
                start_ray(args.address, tracking_uri, sweep.mlflow.outage_s, stop)
                scan, floor = checked.result()
            except SweepInterrupted as exc:  # a signal before the sweep's runs exist
                name = signal.Signals(stop.received or exc.exit_code - 128).name
                raise SweepInterrupted(
                    f"sweep {sweep.name} stopped by {name} before its trials", exc.exit_code
                ) from None
            phases["start_s"] = time.perf_counter() - started
            from segtune.sweep.driver import run_sweep  # imported by the pool's thread

            outcome = run_sweep(
                sweep,
                tracking_uri,
                address=args.address,
                resume=args.resume,
                sweep_yaml=sweep_text(sweep),
                stop=stop,
                scan=scan,
                floor_miou=floor,
                trials_done=report.draw if report is not None else None,
                # nothing of ours competes with the cost stage's timing
                before_timing=report.wait_imported if report is not None else None,
                edits=edits,
            )
        except SweepInterrupted as exc:
            from segtune.sweep.ending import keep_line

            then = (
                f"continue it with: {resume_command(args)}"
                if exc.resumable
                else "Tune saved no state to resume: run it again"
            )
            where = keep_line(sweep, f"{exc}; {then}")  # the terminal may be gone (SIGHUP)
            kept = f"; this line is also in {where}" if where else ""
            raise SweepInterrupted(f"{exc}{kept}; {then}", exc.exit_code, exc.resumable) from None
        finally:
            ray.shutdown()  # where the sweep did not get as far as stopping it
    phases.update(outcome.phases)
    started = time.perf_counter()
    trials = print_summary(sweep, tracking_uri, outcome.parent)
    phases["summary_s"] = time.perf_counter() - started
    index = None
    if report is not None:
        started = time.perf_counter()
        index = report.index()
        phases["report_s"] = time.perf_counter() - started
    print_time_account(trials, tracking_uri, outcome.parent, outcome.slots, phases)
    if index is not None:
        print(f"report: {index}")  # the last line: scripts read the report's path there
    return 1 if outcome.failed else 0


# the summary's columns, and the costs of its Pareto column
SUMMARY_COLUMNS = (
    OBJECTIVE,
    "train_time_min",
    "infer_ms_cpu",
    "infer_ms_gpu",
    "params_m",
    "size_mb",
)
SUMMARY_COSTS = (*PARETO_COSTS, "size_mb")


def print_summary(sweep: SweepConfig, tracking_uri: str, parent: str) -> pd.DataFrame:
    """The trials of the sweep run `parent`, best first, with their Pareto membership; returns
    the trial table it read."""
    from mlflow.tracking import MlflowClient

    from segtune.tracking.query import load_sweep_table
    from segtune.tracking.runs import runs_page
    from segtune.tracking.select import pareto_front

    table = load_sweep_table(sweep.experiment, tracking_uri, sweep_run_id=parent)
    if table.empty:
        print("no trial ran")
        return table
    ok = table[table["status"] == "FINISHED"].copy()
    for key in SUMMARY_COLUMNS:
        if key not in ok:
            ok[key] = math.nan
    costs = [c for c in SUMMARY_COSTS if c in ok and ok[c].notna().any()]
    ok["pareto"] = pareto_front(ok, OBJECTIVE, costs) if len(ok) else []
    ok = ok.sort_values(OBJECTIVE, ascending=False)
    floor = table["floor_miou"].dropna().max() if "floor_miou" in table else math.nan
    below = ok[OBJECTIVE] <= floor  # False where the floor is unknown (NaN)
    ok["note"] = [
        ", ".join(
            filter(
                None,
                [
                    f"stopped {stop}" if stop else "",
                    "noisy cost" if noisy else "",
                    "not above the colour floor" if low else "",
                ],
            )  # fmt: skip
        )
        for stop, noisy, low in zip(ok["early_stopped"], ok["cost_noisy"], below, strict=True)
    ]
    titles = {key: COLUMNS[key][0] for key in SUMMARY_COLUMNS}
    where = ["node"] if table["node"].nunique() > 1 else []  # a sweep over several machines
    shown = ok[["label", *where, *SUMMARY_COLUMNS, "pareto", "note"]].rename(columns=titles)
    print(f"\nsweep {sweep.name}: {len(table)} trials")
    if not math.isnan(floor):
        print(
            f"colour-only floor of the validation split (nearest mean training colour): mIoU "
            f"{floor:.3f}; {int(below.sum())} of {len(ok)} finished trials do not beat it"
        )
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    if sweep.tune.repeats > 1 and len(ok):
        spread = ok.groupby("config_label")[OBJECTIVE].agg(["mean", "std", "count"])
        print("\nmIoU over seeds (mean ± std):")
        for name, row in spread.sort_values("mean", ascending=False).iterrows():
            print(f"  {name}: {row['mean']:.4f} ± {row['std']:.4f} (n={int(row['count'])})")
    for _, row in ok[ok["cost_noisy"] != ""].iterrows():
        print(f"noisy cost {row['label']}: {row['cost_noisy']} (timed with the other work)")
    failed = table[table["status"] == "FAILED"]
    for _, row in failed.iterrows():
        print(f"FAILED {row['label']}: {row['error']}")
    experiment = MlflowClient(tracking_uri).get_experiment_by_name(sweep.experiment)
    if experiment is not None:
        page = runs_page(tracking_uri, experiment.experiment_id, parent)
        print(f"\nthe sweep's trials in the MLflow UI: {page}")
    return table


def print_time_account(
    trials: pd.DataFrame, tracking_uri: str, parent: str, slots: int, phases: dict[str, float]
) -> None:
    """Where the sweep's wall time went (segtune.tracking.timing), from the summary's trial
    table, printed and kept on its run."""
    from mlflow.tracking import MlflowClient

    from segtune.tracking.timing import account, account_lines, log_account

    wall = process_age()
    figures = account(trials, phases, slots, wall)
    log_account(MlflowClient(tracking_uri), parent, figures)
    print("\n".join(account_lines(figures)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
