"""`python -m dashboards.report`: the study's pictures and a summary for any sweep, from MLflow only.

Writes DIR/index.html (relative links to the PNGs beside it) and logs the report to the
sweep's parent run under `report/`. MLflow's UI shows an HTML artifact from a blob URL, where
relative links cannot resolve, so the logged index.html carries its images inline.
"""

from __future__ import annotations

import html
import importlib
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.store.db.db_types import DATABASE_ENGINES
from mlflow.tracking import MlflowClient

from dashboards.analysis import check_ema
from dashboards.page import inline, render
from dashboards.sections import Report, compose
from dashboards.tables import write_tables
from segtune.cli import check_out_folder, command_parser, run_cli, setup_logging
from segtune.config.constraints import parse_constraints
from segtune.config.names import REPORT_DIR
from segtune.errors import ConfigError
from segtune.tracking.address import resolve_tracking_uri
from segtune.tracking.query import load_sweep_data

log = logging.getLogger("dashboards.report")


def _log_report(report: Report, index: Path, images: Sequence[str]) -> None:
    """Upload the report to the sweep's parent run; for --all, the newest one's, in all-sweeps/."""
    data = report.data
    client = MlflowClient(tracking_uri=data.tracking_uri)
    run_id = data.sweeps["run_id"].iloc[0]
    root = REPORT_DIR if len(data.sweeps) == 1 else f"{REPORT_DIR}/all-sweeps"
    with tempfile.TemporaryDirectory() as tmp:
        standalone = Path(tmp) / index.name
        standalone.write_text(render(report, inline(report.out)))
        client.log_artifact(run_id, str(standalone), root)
    for image in images:
        folder = str(Path(image).parent)
        client.log_artifact(
            run_id, str(report.out / image), root if folder == "." else f"{root}/{folder}"
        )
    log.info("logged the report to run %s under %s/", run_id, root)


DEFAULT_EMA = 0.6  # the loss curves' smoothing weight, as TensorBoard's slider


def build_report(
    experiment: str,
    tracking_uri: str | None = None,
    out: Path | None = None,
    sweep_run_id: str | None = None,
    all_sweeps: bool = False,
    ema: float = DEFAULT_EMA,
    constraints: str | None = None,
    log_to_mlflow: bool = True,
    csv: Path | None = None,
) -> Path:
    """Draw every figure of a sweep and write the report (and its tables as CSV into `csv`);
    returns the path of index.html."""
    weight = check_ema(ema)
    out = Path(out) if out is not None else Path("reports") / experiment
    check_out_folder(out, "--out")
    parsed = parse_constraints(constraints) if constraints else []
    data = load_sweep_data(experiment, tracking_uri, sweep_run_id, all_sweeps)
    if csv is not None:
        write_tables(data, Path(csv))
    report = compose(data, out, weight, parsed)

    shown: list[str] = []  # every image the page links to, to log beside it

    def relative(path: str) -> str:
        if path.endswith(".png"):  # Plotly's script is not logged: the logged page holds it
            shown.append(path)
        return html.escape(path)

    index = out / "index.html"
    index.write_text(render(report, relative))
    log.info("report of %d trials: %s", len(data.table), index)
    if log_to_mlflow:
        _log_report(report, index, list(dict.fromkeys(shown)))
    return index


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "python -m dashboards.report",
        "Figures and an HTML report of a sweep, read from MLflow.",
        tracking=True,
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's name)")
    parser.add_argument("--out", type=Path, help="report directory (default: reports/EXPERIMENT)")
    parser.add_argument(
        "--ema", type=float, default=DEFAULT_EMA, help="curve smoothing weight in [0, 1)"
    )
    parser.add_argument(
        "--constraints",
        "--budget",  # its former name
        dest="constraints",
        help="name the best trial within constraints on metrics, comma-separated, with "
        "<=, <, >=, >: e.g. 'infer_ms_cpu<=50,size_mb<20'",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--run-id",
        help="the parent run of one sweep (default: the newest sweep); - reads it from standard "
        "input once imports are done (segtune.run starts its report so, ahead of the sweep's end)",
    )
    which.add_argument("--all", action="store_true", help="every sweep of the experiment")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    parser.add_argument(
        "--csv",
        type=Path,
        metavar="DIR",
        help="also write the numbers as CSV into DIR: trials, configurations (mean and spread "
        "over seeds), comparisons against the spread, curves",
    )
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.run_id == "-":  # started ahead of the sweep's end: import now what reading needs
        uri = resolve_tracking_uri(args.tracking_uri)
        if urlsplit(uri).scheme.split("+")[0] in DATABASE_ENGINES:  # 1 s, else at the first read
            importlib.import_module("mlflow.store.tracking.sqlalchemy_store")
        print("sweep run id:", flush=True)  # the prompt: everything is imported
        args.run_id = sys.stdin.readline().strip()
        if not args.run_id:
            raise ConfigError("--run-id -: standard input ended before a run id")
    index = build_report(
        args.experiment,
        tracking_uri=args.tracking_uri,
        out=args.out,
        sweep_run_id=args.run_id,
        all_sweeps=args.all,
        ema=args.ema,
        constraints=args.constraints,
        log_to_mlflow=not args.no_log,
        csv=args.csv,
    )
    print(index)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
