"""`python -m segtune.run SWEEP.yaml`: a sweep on Ray Tune, every trial recorded in MLflow.

Order of work: validate the sweep file completely (exit 2 on any problem, before Ray or MLflow
start), pre-flight (dataset, pretrained weights, schedulable resources), then one parent MLflow
run and a Tuner; at the end a summary table, the report, and exit 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from segtune.cli import run_cli, setup_logging
from segtune.config import SweepConfig, load_sweep
from segtune.data.pipeline import split_samples
from segtune.errors import ConfigError, ModelError
from segtune.models import pretrained_weights_file
from segtune.space import check_combinations, describe, discrete_trials

log = logging.getLogger("segtune.run")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segtune.run", description=__doc__)
    p.add_argument("sweep", help="sweep YAML file, e.g. sweeps/task3.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a sweep value, e.g. --set train.epochs=2 (repeatable)",
    )
    p.add_argument("--address", help="join a running Ray cluster: auto or HOST:PORT")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--dry-run", action="store_true", help="print the trials or space and exit")
    p.add_argument("--no-report", action="store_true", help="skip the dashboard report")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def absolute_paths(sweep: SweepConfig, tracking_uri: str) -> tuple[SweepConfig, str]:
    """Trials run in Ray's own working directories: make every local path absolute."""
    data = sweep.data.model_copy(update={"root": str(Path(sweep.data.root).resolve())})
    tune = sweep.tune.model_copy(
        update={"storage_path": str(Path(sweep.tune.storage_path).resolve())}
    )
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        tracking_uri = "sqlite:///" + str(Path(tracking_uri[len("sqlite:///") :]).resolve())
    return sweep.model_copy(update={"data": data, "tune": tune}), tracking_uri


def dry_run(sweep: SweepConfig) -> None:
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


def preflight(sweep: SweepConfig, local: bool) -> None:
    """Fail before any trial on what would fail every trial."""
    problems = check_combinations(sweep)
    if problems:
        raise ConfigError("impossible combinations:\n  " + "\n  ".join(problems))
    missing: dict[str, None] = {}
    for cfg in discrete_trials(sweep):
        if cfg.pretrained == "imagenet":
            path = pretrained_weights_file(cfg.backbone)
            if not path.is_file():
                missing[f"{cfg.backbone}: {path}"] = None
        elif cfg.pretrained != "none" and not Path(cfg.pretrained).is_file():
            missing[f"pretrained: {cfg.pretrained} (no such file)"] = None
    if missing:
        raise ModelError(
            "pretrained weights missing (place the torchvision files in $TORCH_HOME/hub/"
            "checkpoints, or run with --set train.pretrained=none):\n  " + "\n  ".join(missing)
        )
    gpu = sweep.tune.resources_per_trial.gpu
    if local and gpu > 0:
        import torch

        if torch.cuda.device_count() == 0:
            raise ConfigError(
                f"tune.resources_per_trial.gpu: {gpu} asked, but this machine has no GPU; "
                "set it to 0 (--set tune.resources_per_trial.gpu=0) or join a GPU cluster "
                "with --address"
            )
    split_samples(sweep.data, progress=True)  # generates a synthetic set, checks every pair


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    sweep = load_sweep(args.sweep, args.set)
    if args.dry_run:
        if problems := check_combinations(sweep):
            raise ConfigError("impossible combinations:\n  " + "\n  ".join(problems))
        dry_run(sweep)
        return 0

    from segtune.tracking import resolve_tracking_uri

    sweep, tracking_uri = absolute_paths(
        sweep, resolve_tracking_uri(args.tracking_uri or sweep.mlflow.tracking_uri)
    )
    preflight(sweep, local=args.address is None)
    from segtune.sweep import run_sweep

    return run_sweep(
        sweep,
        tracking_uri,
        address=args.address,
        resume=args.resume,
        report=not args.no_report,
        sweep_yaml=yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False),
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
