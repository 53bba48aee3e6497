"""`python -m dashboards.report`: the seed's pictures and a summary for any sweep, from MLflow only.

Writes DIR/index.html (relative links to the PNGs beside it) and logs the report to the
sweep's parent run under `report/`. MLflow's UI shows an HTML artifact from a blob URL, where
relative links cannot resolve, so the logged index.html carries its images inline.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from dashboards import figures
from dashboards.analysis import (
    COSTS,
    OBJECTIVE,
    Constraint,
    check_ema,
    compare_configs,
    pareto_front,
    parse_budget,
    seed_groups,
    within_budget,
)
from dashboards.data import (
    PARAM_PREFIX,
    SweepData,
    download_eval,
    load_sweep_data,
    metrics_at_step,
)
from segtune.cli import run_cli, setup_logging
from segtune.metrics import iou_per_class
from segtune.tracking import CONFUSION_ARTIFACT, EXAMPLES_DIR, PER_IMAGE_ARTIFACT, REPORT_DIR

log = logging.getLogger(__name__)

FAILED = "FAILED"
COST_NAMES = {"train_time_min": "train time", "infer_ms_gpu": "GPU", "infer_ms_cpu": "CPU"}
TABLE_METRICS = (
    (OBJECTIVE, "{:.3f}"),
    ("best_epoch", "{:.0f}"),
    ("train_time_min", "{:.2f}"),
    ("infer_ms_cpu", "{:.1f}"),
    ("infer_ms_gpu", "{:.2f}"),
    ("size_mb", "{:.1f}"),
    ("params_m", "{:.2f}"),
    ("gflops", "{:.2f}"),
)
EXAMPLE = re.compile(r"^(best|worst)_(\d+)_(.+)\.png$")
BEST_DIR = "best"  # the best trial's eval artifacts, downloaded beside the report


@dataclass
class Picture:
    path: str  # relative to the report directory
    caption: str
    trials: list[str] = field(default_factory=list)  # the trials it shows


@dataclass
class BestTrial:
    row: pd.Series
    overall: list[tuple[str, str, str]] = field(default_factory=list)  # kind, path, caption
    per_class: list[dict[str, object]] = field(default_factory=list)
    figures: list[Picture] = field(default_factory=list)


@dataclass
class Report:
    data: SweepData
    out: Path
    weight: float
    budget: list[Constraint]
    figures: dict[str, list[Picture]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    fronts: dict[str, pd.Series] = field(default_factory=dict)
    in_budget: pd.Series | None = None
    best: BestTrial | None = None

    def figure(self, section: str, name: str, caption: str, drawn: figures.Drawn) -> None:
        """Record a figure its drawing function wrote, or the note saying why it could not."""
        if drawn.note:
            self.notes.append(drawn.note)
        if drawn.labels:
            self.figures.setdefault(section, []).append(Picture(name, caption, drawn.labels))


def _fmt(value: object, pattern: str) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "—"
    return "—" if pd.isna(number) else pattern.format(number)


def _short(row: pd.Series) -> str:
    """A trial in prose: label and objective."""
    return f"{row['label']} ({OBJECTIVE} {_fmt(row.get(OBJECTIVE), '{:.3f}')})"


# --- the sections ---------------------------------------------------------------------------


def _curves(report: Report, trials: pd.DataFrame, colors: dict) -> None:
    for key, caption in (
        ("train_loss", "Training loss, one line per trial (the seed's Pictures 1 and 3)."),
        ("val_loss", "Validation loss, one line per trial (the seed's Pictures 2 and 4)."),
        ("val_miou", "Validation mIoU by epoch."),
    ):
        drawn = figures.curves(
            report.data, trials, key, colors, report.weight, report.out / f"{key}.png"
        )
        report.figure("curves", f"{key}.png", caption, drawn)


def _pareto(report: Report, trials: pd.DataFrame, colors: dict) -> None:
    pictures = {"train_time_min": 5, "infer_ms_gpu": 6, "infer_ms_cpu": 7}
    for cost in COSTS:
        name = f"pareto_{cost}.png"
        drawn = figures.pareto(trials, cost, colors, report.out / name)
        report.figure(
            "pareto",
            name,
            f"{OBJECTIVE} against {cost}; bubble area proportional to size_mb; black rings and "
            f"the dashed line: the Pareto front (the seed's Picture {pictures[cost]}).",
            drawn,
        )
        front = pareto_front(trials, OBJECTIVE, [cost])
        if front.any():
            report.fronts[cost] = front
            names = ", ".join(trials.loc[front, "label"])
            report.summary.append(f"Pareto front of {OBJECTIVE} vs {cost}: {names}.")
    drawn = figures.size_bars(trials, colors, report.out / "size_mb.png")
    report.figure("pareto", "size_mb.png", "Model size per configuration (Picture 8).", drawn)


def _seeds(report: Report, trials: pd.DataFrame, colors: dict) -> None:
    groups = seed_groups(trials)
    if groups.empty or (groups["n"] < 2).all():
        report.summary.append(
            "Every configuration ran with a single seed, so no difference here is known to "
            "exceed seed-to-seed noise; set `tune.repeats: 3` in the sweep to measure it."
        )
        return
    report.figure(
        "seeds",
        "seeds_best_val_miou.png",
        f"{OBJECTIVE} per configuration: each seed a dot, mean ± std of the seeds a blue bar.",
        figures.seed_spread(groups, trials, report.out / "seeds_best_val_miou.png"),
    )
    drawn = figures.seed_bands(
        report.data, groups, colors, trials, report.out / "seeds_val_miou.png"
    )
    report.figure("seeds", "seeds_val_miou.png", "val_miou by epoch, mean ± std over seeds.", drawn)
    comparisons = compare_configs(groups)
    if not comparisons:
        report.summary.append(
            "Only one configuration ran several seeds: nothing to compare against its spread."
        )
    for c in comparisons:
        verdict = (
            "larger than the seed-to-seed spread"
            if c.beyond_spread
            else "within the seed-to-seed spread (not a difference on this evidence)"
        )
        report.summary.append(
            f"{c.a} vs {c.b} (differ in {c.differs_in or 'nothing but the seed'}): "
            f"Δ{OBJECTIVE} = {c.diff:+.3f}, seed std {c.std_a:.3f} / {c.std_b:.3f}: {verdict}."
        )


def _budget(report: Report, trials: pd.DataFrame) -> None:
    if report.in_budget is None:
        return
    text = ", ".join(str(c) for c in report.budget)
    fitting = trials[report.in_budget].dropna(subset=[OBJECTIVE])
    if fitting.empty:
        report.summary.append(f"No trial fits the budget {text}.")
    else:
        best = fitting.loc[fitting[OBJECTIVE].idxmax()]
        report.summary.append(f"Best within the budget {text}: {_short(best)}.")


def _iou_per_class(report: Report, row: pd.Series, matrix: pd.DataFrame | None) -> dict[str, float]:
    """From eval/confusion.csv (counts, as ConfusionMatrix writes them), else the IoU metrics of
    the best epoch."""
    if matrix is not None:
        iou = iou_per_class(matrix.to_numpy(dtype=float))
        return {
            str(name): float(v) for name, v in zip(matrix.index, iou, strict=True) if pd.notna(v)
        }
    keys = [c for c in report.data.metric_columns if c.startswith("val_iou_")]
    epoch = row.get("best_epoch")
    if not keys or pd.isna(epoch):
        return {}
    found = metrics_at_step(report.data.tracking_uri, row["run_id"], keys, int(epoch))
    return {k[len("val_iou_") :]: v for k, v in found.items()}


def _read_per_image(report: Report, path: Path) -> pd.DataFrame | None:
    """eval/per_image.csv (id, miou, iou_<class>), or None with a note saying what is wrong."""
    if not path.is_file():
        report.notes.append(f"the best trial has no {PER_IMAGE_ARTIFACT}: no per-class table")
        return None
    scores = pd.read_csv(path, dtype={"id": str})
    if "id" not in scores.columns:
        report.notes.append(f"{PER_IMAGE_ARTIFACT} of the best trial has no `id` column")
        return None
    return scores


def _read_confusion(report: Report, path: Path) -> pd.DataFrame | None:
    """eval/confusion.csv: square, class names as index and columns, rows the ground truth."""
    if not path.is_file():
        report.notes.append(f"the best trial has no {CONFUSION_ARTIFACT}: no confusion matrix")
        return None
    matrix = pd.read_csv(path, index_col=0).apply(pd.to_numeric, errors="coerce")
    if matrix.shape[0] != matrix.shape[1] or matrix.isna().to_numpy().any():
        report.notes.append(
            f"{CONFUSION_ARTIFACT} of the best trial is not a square numeric table "
            f"(shape {matrix.shape}): no confusion matrix"
        )
        return None
    return matrix


def _best_trial(report: Report, trials: pd.DataFrame) -> None:
    """The seed's Task 4 for the best trial: galleries, per-class table, confusion, IoU bars."""
    ranked = trials.dropna(subset=[OBJECTIVE])
    if ranked.empty:
        report.notes.append(f"no trial has `{OBJECTIVE}`: no best trial to analyse")
        return
    row = ranked.loc[ranked[OBJECTIVE].idxmax()]
    best = report.best = BestTrial(row)
    report.summary.append(f"Best trial: {_short(row)}.")
    root = report.out / BEST_DIR
    if download_eval(report.data.tracking_uri, row["run_id"], "eval", root) is None:
        report.notes.append(f"the best trial {row['label']} has no eval/ artifacts")
        return
    examples = root / EXAMPLES_DIR
    files = sorted(p.name for p in examples.glob("*.png")) if examples.is_dir() else []
    scores = _read_per_image(report, root / PER_IMAGE_ARTIFACT)
    miou = {}
    if scores is not None and "miou" in scores.columns:
        miou = dict(zip(scores["id"], scores["miou"], strict=True))
    for kind in ("best", "worst"):
        for name in sorted((f for f in files if f.startswith(kind + "_")), key=_rank):
            match = EXAMPLE.match(name)
            if match:
                rank, image_id = match.group(2), match.group(3)
                caption = f"{kind} #{rank}: {image_id}, mIoU {_fmt(miou.get(image_id), '{:.3f}')}"
                best.overall.append((kind, f"{BEST_DIR}/{EXAMPLES_DIR}/{name}", caption))
    if scores is not None:
        best.per_class = _per_class_examples(scores, set(files))
    matrix = _read_confusion(report, root / CONFUSION_ARTIFACT)
    if matrix is not None:
        figures.confusion(matrix, report.out / "confusion.png", f"Confusion matrix, {row['label']}")
        best.figures.append(
            Picture("confusion.png", "Row-normalised confusion matrix (rows: ground truth).")
        )
    iou = _iou_per_class(report, row, matrix)
    if iou:
        figures.iou_bars(iou, report.out / "iou_per_class.png", f"IoU per class, {row['label']}")
        best.figures.append(Picture("iou_per_class.png", "IoU per class of the best trial."))


def _rank(name: str) -> int:
    match = EXAMPLE.match(name)
    return int(match.group(2)) if match else 0


def _per_class_examples(scores: pd.DataFrame, files: set[str]) -> list[dict[str, object]]:
    """For each class, the images with its highest and lowest IoU, and their composites."""
    rows = []
    for column in (c for c in scores.columns if c.startswith("iou_")):
        name = column[len("iou_") :]
        values = pd.to_numeric(scores[column], errors="coerce")
        entry: dict[str, object] = {"class": name}
        if values.notna().any():
            for kind, idx in (("best", values.idxmax()), ("worst", values.idxmin())):
                image_id = scores.at[idx, "id"]
                composite = f"class_{name}_{kind}_{image_id}.png"
                entry[kind] = (
                    image_id,
                    float(values[idx]),
                    f"{BEST_DIR}/{EXAMPLES_DIR}/{composite}" if composite in files else None,
                )
        rows.append(entry)
    return rows


# --- HTML -----------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed{color:#999} tr.failed td.error{color:#b00}
tr.best td:first-child{font-weight:bold}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.gallery img{width:100%;max-width:960px} .thumb{width:330px}
.notes li{color:#8a5a00} .wide{overflow-x:auto} code{background:#f4f4f4;padding:0 .2em}
"""


def _run_link(report: Report, run_id: str) -> str:
    uri = report.data.tracking_uri
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/#/experiments/{report.data.experiment_id}/runs/{run_id}"
        return f'<a href="{html.escape(url)}">{run_id[:8]}</a>'
    return f"<code>{run_id}</code>"


def _summary_table(report: Report) -> str:
    """Every trial, failed ones last with their error; data-run-id marks a trial's row."""
    data = report.data
    table = data.table
    params = data.varying_params()
    metrics = [(m, p) for m, p in TABLE_METRICS if m in table.columns]
    order = table.assign(
        _failed=table["status"] == FAILED, _obj=pd.to_numeric(table.get(OBJECTIVE), errors="coerce")
    ).sort_values(["_failed", "_obj"], ascending=[True, False], na_position="last")
    head = ["trial", "status", *(p[len(PARAM_PREFIX) :] for p in params), *(m for m, _ in metrics)]
    head += (
        ["Pareto front"] + (["in budget"] if report.in_budget is not None else []) + ["MLflow run"]
    )
    lines = ['<div class="wide"><table id="summary"><thead><tr>']
    lines += [f"<th>{html.escape(h)}</th>" for h in head]
    lines.append("</tr></thead><tbody>")
    best_id = report.best.row["run_id"] if report.best is not None else None
    for idx, row in order.iterrows():
        failed = row["status"] == FAILED
        css = "failed" if failed else ("best" if row["run_id"] == best_id else "")
        cells = [html.escape(str(row["label"])), html.escape(str(row["status"]))]
        cells += [html.escape(str(row[p])) if pd.notna(row[p]) else "—" for p in params]
        num = [_fmt(row[m], pattern) for m, pattern in metrics]
        fronts = [
            COST_NAMES[c] for c, mask in report.fronts.items() if idx in mask.index and mask[idx]
        ]
        tail = [", ".join(fronts)]
        if report.in_budget is not None:
            tail.append("yes" if idx in report.in_budget.index and report.in_budget[idx] else "")
        tail.append(_run_link(report, row["run_id"]))
        tds = [f"<td>{c}</td>" for c in cells] + [f'<td class="num">{c}</td>' for c in num]
        tds += [f"<td>{c}</td>" for c in tail]
        lines.append(f'<tr class="{css}" data-run-id="{row["run_id"]}">{"".join(tds)}</tr>')
        if failed and row["error"]:
            lines.append(
                f'<tr class="failed detail"><td class="error" colspan="{len(head)}">'
                f"{html.escape(str(row['error'])[:400])}</td></tr>"
            )
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


def _figures_html(items: Sequence[Picture], src: Callable[[str], str]) -> str:
    return "\n".join(
        f'<figure data-trials="{html.escape("|".join(f.trials))}">'
        f'<img src="{src(f.path)}" alt="{html.escape(f.path)}">'
        f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        for f in items
    )


def _best_html(report: Report, src: Callable[[str], str]) -> str:
    best = report.best
    if best is None:
        return ""
    parts = [f"<h2>Best trial: {html.escape(str(best.row['label']))}</h2>"]
    for kind, title in (
        ("best", "Good detection cases (Picture 10)"),
        ("worst", "Poor detection cases (Picture 9)"),
    ):
        items = [(p, c) for k, p, c in best.overall if k == kind]
        if items:
            parts.append(
                f"<h3>{title}</h3><p>Left: image, middle: prediction, right: ground truth.</p>"
            )
            parts += [
                f'<figure class="gallery"><img src="{src(p)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
                for p, c in items
            ]
    if best.per_class:
        parts.append("<h3>Per class: the image with the highest and the lowest IoU</h3>")
        parts.append(
            '<table id="per-class"><tr><th>class</th><th>good example</th><th>bad example</th></tr>'
        )
        for entry in best.per_class:
            cells = []
            for kind in ("best", "worst"):
                if kind not in entry:
                    cells.append("<td>None (class absent)</td>")
                    continue
                image_id, iou, path = entry[kind]
                text = f"{html.escape(str(image_id))}: IoU {iou:.3f}"
                img = (
                    f'<br><img class="thumb" src="{src(path)}" alt="{html.escape(path)}">'
                    if path
                    else ""
                )
                cells.append(f"<td>{text}{img}</td>")
            parts.append(f"<tr><td>{html.escape(str(entry['class']))}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    parts.append(_figures_html(best.figures, src))
    return "\n".join(parts)


def render(report: Report, src: Callable[[str], str]) -> str:
    """The whole page; `src` turns a report-relative image path into an <img> source."""
    data = report.data
    trials = data.table
    sweeps = ", ".join(f"{s.run_name} ({s.run_id[:8]})" for s in data.sweeps.itertuples())
    counts = trials["status"].value_counts().to_dict()
    status = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
    header = [
        f"<h1>{html.escape(data.experiment)}</h1>",
        f"<p>Sweep{'s' if len(data.sweeps) > 1 else ''}: {html.escape(sweeps)}. "
        f"{len(trials)} trials: {html.escape(status)}. Tracking URI: <code>{html.escape(data.tracking_uri)}</code>.</p>",
    ]
    if not data.tracking_uri.startswith(("http://", "https://")):
        header.append(
            "<p>Browse the runs with <code>mlflow ui --backend-store-uri "
            f"{html.escape(data.tracking_uri)}</code> and look them up by run id.</p>"
        )
    body = header + ["<h2>Summary</h2><ul>"]
    body += [f"<li>{html.escape(s)}</li>" for s in report.summary] + ["</ul>"]
    body.append(_summary_table(report))
    if report.notes:
        body.append('<h2>Notes</h2><ul class="notes">')
        body += [f"<li>{html.escape(n)}</li>" for n in report.notes] + ["</ul>"]
    for section, title in (
        ("curves", "Training curves"),
        ("pareto", "Quality against cost"),
        ("seeds", "Seed-to-seed spread"),
    ):
        if report.figures.get(section):
            body.append(f"<h2>{title}</h2>" + _figures_html(report.figures[section], src))
    body.append(_best_html(report, src))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>segtune report: {html.escape(data.experiment)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def _inline(out: Path) -> Callable[[str], str]:
    def src(path: str) -> str:
        return "data:image/png;base64," + base64.b64encode((out / path).read_bytes()).decode()

    return src


def _log_report(report: Report, index: Path, images: Sequence[str]) -> None:
    """Upload the report to the sweep's parent run; for --all, the newest one's, in all-sweeps/."""
    data = report.data
    client = MlflowClient(tracking_uri=data.tracking_uri)
    run_id = data.sweeps["run_id"].iloc[0]
    root = REPORT_DIR if len(data.sweeps) == 1 else f"{REPORT_DIR}/all-sweeps"
    with tempfile.TemporaryDirectory() as tmp:
        standalone = Path(tmp) / index.name
        standalone.write_text(render(report, _inline(report.out)))
        client.log_artifact(run_id, str(standalone), root)
    for image in images:
        folder = str(Path(image).parent)
        client.log_artifact(
            run_id, str(report.out / image), root if folder == "." else f"{root}/{folder}"
        )
    log.info("logged the report to run %s under %s/", run_id, root)


def build_report(
    experiment: str,
    tracking_uri: str | None = None,
    out: Path | None = None,
    sweep_run_id: str | None = None,
    all_sweeps: bool = False,
    ema: float = 0.6,
    budget: str | None = None,
    log_to_mlflow: bool = True,
) -> Path:
    """Draw every figure of a sweep and write the report; returns the path of index.html."""
    weight = check_ema(ema)
    constraints = parse_budget(budget) if budget else []
    data = load_sweep_data(experiment, tracking_uri, sweep_run_id, all_sweeps)
    out = Path(out) if out is not None else Path("reports") / experiment
    trials = data.table[data.table["status"] != FAILED]
    report = Report(data, out, weight, constraints)
    if constraints:  # checked against the sweep's metrics before anything is drawn
        report.in_budget = within_budget(trials, constraints, data.metric_columns)
    out.mkdir(parents=True, exist_ok=True)
    colors = figures.trial_colors(list(trials["label"]))
    _best_trial(report, trials)
    _budget(report, trials)
    _curves(report, trials, colors)
    _pareto(report, trials, colors)
    _seeds(report, trials, colors)
    for _, row in data.table[data.table["status"] == FAILED].iterrows():
        report.notes.append(
            f"failed trial {row['label']} (not plotted): {row['error'] or 'no error recorded'}"
        )

    shown: list[str] = []  # every image the page links to, to log beside it

    def relative(path: str) -> str:
        shown.append(path)
        return html.escape(path)

    index = out / "index.html"
    index.write_text(render(report, relative))
    log.info("report of %d trials: %s", len(data.table), index)
    if log_to_mlflow:
        _log_report(report, index, list(dict.fromkeys(shown)))
    return index


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dashboards.report",
        description="Figures and an HTML report of a sweep, read from MLflow.",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's name)")
    parser.add_argument(
        "--tracking-uri", help="default: MLFLOW_TRACKING_URI, else MLflow's default"
    )
    parser.add_argument("--out", type=Path, help="report directory (default: reports/EXPERIMENT)")
    parser.add_argument("--ema", type=float, default=0.6, help="curve smoothing weight in [0, 1)")
    parser.add_argument(
        "--budget",
        help="name the best trial within constraints on metrics, comma-separated, with "
        "<=, <, >=, >: e.g. 'infer_ms_cpu<=50,size_mb<20'",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run-id", help="the parent run of one sweep (default: the newest sweep)")
    which.add_argument("--all", action="store_true", help="every sweep of the experiment")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    index = build_report(
        args.experiment,
        tracking_uri=args.tracking_uri,
        out=args.out,
        sweep_run_id=args.run_id,
        all_sweeps=args.all,
        ema=args.ema,
        budget=args.budget,
        log_to_mlflow=not args.no_log,
    )
    print(index)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
