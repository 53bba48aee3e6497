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
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from segtune.cli import command_parser, process_age, run_cli, setup_logging
from segtune.config.sweep import SweepConfig, load_sweep
from segtune.errors import ConfigError
from segtune.sweep.report_process import EarlyReport
from segtune.sweep.signals import StopSignals, SweepInterrupted

if TYPE_CHECKING:
    pass

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
    """The command that continues this sweep: this interpreter, the same file, overrides, store
    (without its credentials: `_credentials_apart`), cluster and flags."""
    words = [sys.executable, "-m", "segtune.run", args.sweep, "--resume"]
    words += ["--accept-changes"] * args.accept_changes  # harmless once the edits are the sweep's
    for item in args.set:
        words += ["--set", item]
    if args.tracking_uri:
        words += ["--tracking-uri", args.tracking_uri]
    if args.address:
        words += ["--address", args.address]
    words += ["--no-report"] * args.no_report + ["--verbose"] * args.verbose
    from segtune.tracking.address import PASSWORD_ENV, USER_ENV

    given = f" (with {USER_ENV} and {PASSWORD_ENV} set)" if PASSWORD_ENV in os.environ else ""
    return shlex.join(words) + given


def _credentials_apart(args: argparse.Namespace, sweep: SweepConfig) -> SweepConfig:
    """The tracking URI's credentials moved into MLflow's variables (`take_credentials`) before
    anything prints, stores or passes the URI on: the resume command (its `--set`s too), the
    report's command line, the sweep's saved copy and its `sweep.yaml` hold it without them."""
    from segtune.tracking.address import bare_uri, take_credentials

    take_credentials(args.tracking_uri or sweep.mlflow.tracking_uri or "")
    args.tracking_uri = args.tracking_uri and bare_uri(args.tracking_uri)
    for i, item in enumerate(args.set):  # --set mlflow.tracking_uri=URI
        key, _, value = item.partition("=")
        args.set[i] = f"{key}={bare_uri(value)}" if key.strip() == "mlflow.tracking_uri" else item
    bare = sweep.mlflow.tracking_uri and bare_uri(sweep.mlflow.tracking_uri)
    return sweep.model_copy(
        update={"mlflow": sweep.mlflow.model_copy(update={"tracking_uri": bare})}
    )


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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.accept_changes and not args.resume:
        raise ConfigError(
            "--accept-changes: only with --resume, for a started sweep whose file was edited; "
            "a new sweep runs its file as it is"
        )
    sweep = _credentials_apart(args, load_sweep(args.sweep, args.set))
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
    from segtune.sweep.preflight import absolute_paths, checked_while_ray_starts
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
                checked = pool.submit(checked_while_ray_starts, sweep, args.address is None)
                start_ray(args.address, tracking_uri, sweep.mlflow.outage_s, stop)
                scan, floor = checked.result()
            except SweepInterrupted as exc:  # a signal before the sweep's runs exist
                name = signal.Signals(stop.received or exc.exit_code - 128).name
                raise SweepInterrupted(
                    f"sweep {sweep.name} stopped by {name} before its trials", exc.exit_code
                ) from None
            phases["start_s"] = time.perf_counter() - started
            from segtune.sweep.driver import DriverInputs, run_sweep  # the pool's thread's

            given = DriverInputs(
                address=args.address,
                resume=args.resume,
                sweep_yaml=sweep_text(sweep),
                scan=scan,
                floor_miou=floor,
                trials_done=report.draw if report is not None else None,
                # nothing of ours competes with the cost stage's timing
                before_timing=report.wait_imported if report is not None else None,
                edits=edits,
            )
            outcome = run_sweep(sweep, tracking_uri, stop, given)
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
    from segtune.sweep.summary import print_summary, print_time_account

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


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
