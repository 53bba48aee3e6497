"""What the report says, computed from a sweep's tables: its figures, its summary lines, its
notes, and the study's Task 4 analysis of the best trial. `dashboards.page` lays it out."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dashboards import class_figures, figures, importance, interactive
from dashboards.analysis import compare_configs, seed_groups
from segtune.classes import iou_per_class
from segtune.config.constraints import Constraint
from segtune.config.names import (
    CONFUSION_ARTIFACT,
    DATA_WAIT_MEAN,
    EVAL_DIR,
    EXAMPLES_DIR,
    INPUT_BOUND_FIX,
    INPUT_BOUND_FRAC,
    OBJECTIVE,
    PARETO_COSTS,
    PER_IMAGE_ARTIFACT,
    format_metric,
    input_bound,
)
from segtune.tracking.excluded import excluded_lines
from segtune.tracking.query import (
    SEED_PARAM,
    SweepData,
    download_eval,
    metrics_at_step,
    reused_runs,
)
from segtune.tracking.runs import run_page
from segtune.tracking.select import pareto_front, within_constraints

FAILED = "FAILED"
EXAMPLE = re.compile(r"^(best|worst)_(\d+)_(.+)\.png$")
BEST_DIR = "best"  # the best trial's eval artifacts, downloaded beside the report


@dataclass
class Picture:
    path: str  # relative to the report directory
    caption: str
    trials: list[str] = field(default_factory=list)  # the trials it shows
    plot: str = ""  # the same view as an interactive Plotly <div> (dashboards.interactive)


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
    constraints: list[Constraint]
    figures: dict[str, list[Picture]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    fronts: dict[str, pd.Series] = field(default_factory=dict)
    within: pd.Series | None = None  # the trials within --constraints
    best: BestTrial | None = None

    def figure(
        self, section: str, name: str, caption: str, drawn: figures.Drawn, plot: str = ""
    ) -> None:
        """Record a figure its drawing function wrote, or the note saying why it could not."""
        if drawn.note:
            self.notes.append(drawn.note)
        if drawn.labels:
            self.figures.setdefault(section, []).append(Picture(name, caption, drawn.labels, plot))

    def link(self, run_id: str) -> str:
        """Where a trial's point leads: its run page on a tracking server, else its run id."""
        data = self.data
        return run_page(data.tracking_uri, data.experiment_id, run_id) or run_id


def _short(row: pd.Series) -> str:
    """A trial in prose: label and objective."""
    return f"{row['label']} ({OBJECTIVE} {format_metric(row.get(OBJECTIVE), '{:.3f}')})"


# --- the sections ---------------------------------------------------------------------------


def _floor(report: Report, trials: pd.DataFrame) -> None:
    """The first line: the colour-only floor and the trials that do not beat it."""
    floors = pd.to_numeric(trials.get("floor_miou", pd.Series(dtype=float)), errors="coerce")
    if floors.dropna().empty:
        return
    floor = floors.max()
    below = trials[pd.to_numeric(trials[OBJECTIVE], errors="coerce") <= floors]
    names = ", ".join(below["label"]) or "none"
    report.summary.append(
        f"Colour-only floor of the validation split (each pixel the class of the nearest mean "
        f"training colour): {OBJECTIVE} {floor:.3f}. Trials that do not beat it ({len(below)} of "
        f"{len(trials)}): {names}."
    )


def _reused(report: Report) -> None:
    """The earlier runs a warm start reused (not trained again here), with their links."""
    data = report.data
    for run in reused_runs(data.tracking_uri, data.sweeps["run_id"]):
        link = run_page(data.tracking_uri, str(run["experiment_id"]), str(run["run_id"]))
        report.summary.append(
            f"Reused from an earlier sweep (warm start): {run['label']} ({OBJECTIVE} "
            f"{format_metric(run[OBJECTIVE], '{:.3f}')}), {link or 'run ' + str(run['run_id'])}."
        )


def _input_bound(report: Report, trials: pd.DataFrame) -> None:
    """The trials whose loader held them back: what to change before renting more GPUs."""
    if DATA_WAIT_MEAN not in trials:
        return
    starved = trials[trials[DATA_WAIT_MEAN].map(input_bound).astype(bool)]
    if starved.empty:
        return
    names = ", ".join(f"{row['label']} {row[DATA_WAIT_MEAN]:.0%}" for _, row in starved.iterrows())
    report.summary.append(
        f"Input-bound trials (waited for data more than {INPUT_BOUND_FRAC:.0%} of the epoch, "
        f"mean over epochs): {names}; try {INPUT_BOUND_FIX}."
    )


def _curves(report: Report, trials: pd.DataFrame, colors: dict) -> None:
    for key, caption in (
        ("train_loss", "Training loss, one line per trial (the study's Pictures 1 and 3)."),
        ("val_loss", "Validation loss, one line per trial (the study's Pictures 2 and 4)."),
        ("val_miou", "Validation mIoU by epoch."),
    ):
        drawn = figures.curves(
            report.data, trials, key, colors, report.weight, report.out / f"{key}.png"
        )
        report.figure("curves", f"{key}.png", caption, drawn)


def _pareto(report: Report, trials: pd.DataFrame, colors: dict) -> None:
    pictures = {"train_time_min": 5, "infer_ms_gpu": 6, "infer_ms_cpu": 7}
    links = {run_id: report.link(run_id) for run_id in trials["run_id"]}
    params = report.data.varying_params()
    for cost in PARETO_COSTS:
        name = f"pareto_{cost}.png"
        drawn = figures.pareto(trials, cost, colors, report.out / name)
        plot = interactive.pareto(trials, cost, colors, links, params)
        report.figure(
            "pareto",
            name,
            f"{OBJECTIVE} against {cost}; bubble area proportional to size_mb; black rings and "
            f"the dashed line: the Pareto front (the study's Picture {pictures[cost]}). "
            "Hover a point for its trial, click it for its MLflow run.",
            drawn,
            interactive.div(plot, f"plot-{name[:-4]}") if plot is not None else "",
        )
        front = pareto_front(trials, OBJECTIVE, [cost])
        if front.any():
            report.fronts[cost] = front
            names = ", ".join(trials.loc[front, "label"])
            report.summary.append(f"Pareto front of {OBJECTIVE} vs {cost}: {names}.")
    for _, row in trials[trials.get("cost_noisy", pd.Series("", trials.index)) != ""].iterrows():
        report.notes.append(
            f"noisy cost {row['label']}: {row['cost_noisy']}; its latency was timed while "
            "other work ran and may be too high (segtune.sweep.cost_stage retried it)"
        )
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


def _importance(report: Report, trials: pd.DataFrame) -> None:
    """What mattered: the importance of the searched keys, and parallel coordinates."""
    params = report.data.varying_params(exclude=[SEED_PARAM])
    finished = trials[trials["status"] == "FINISHED"]
    study = importance.searched_study(finished, params, OBJECTIVE)
    if study is None:
        return
    ranked = importance.importances(study)
    report.summary.append(
        f"What mattered for {OBJECTIVE} (Optuna's PED-ANOVA importance over "
        f"{len(study.trials)} finished trials): "
        + ", ".join(f"{key} {share:.2f}" for key, share in ranked.items())
        + "."
    )
    names, plots = importance.importance_figures(study, list(ranked), report.out)
    captions = (
        f"Importance of each searched key for {OBJECTIVE} (Optuna's PED-ANOVA: how much the "
        "key's values differ between the best trials and all of them).",
        f"Every trial as one line across the searched keys, coloured by {OBJECTIVE}.",
    )
    labels = [str(t.user_attrs["label"]) for t in study.trials]
    for name, caption, plot in zip(names, captions, plots, strict=True):
        report.figure(
            "importance",
            name,
            caption,
            figures.Drawn(labels),
            interactive.div(plot, f"plot-{name[:-4]}"),
        )


def _constraints(report: Report, trials: pd.DataFrame) -> None:
    if report.within is None:
        return
    text = ", ".join(str(c) for c in report.constraints)
    fitting = trials[report.within].dropna(subset=[OBJECTIVE])
    if fitting.empty:
        report.summary.append(f"No trial is within the constraints {text}.")
    else:
        best = fitting.loc[fitting[OBJECTIVE].idxmax()]
        report.summary.append(f"Best within the constraints {text}: {_short(best)}.")


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
    """The study's Task 4 for the best trial: galleries, per-class table, confusion, IoU bars."""
    ranked = trials.dropna(subset=[OBJECTIVE])
    if ranked.empty:
        report.notes.append(f"no trial has `{OBJECTIVE}`: no best trial to analyse")
        return
    row = ranked.loc[ranked[OBJECTIVE].idxmax()]
    best = report.best = BestTrial(row)
    report.summary.append(f"Best trial: {_short(row)}.")
    root = report.out / BEST_DIR
    if download_eval(report.data.tracking_uri, row["run_id"], EVAL_DIR, root) is None:
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
                caption = f"{kind} #{rank}: {image_id}, mIoU {format_metric(miou.get(image_id), '{:.3f}')}"
                best.overall.append((kind, f"{BEST_DIR}/{EXAMPLES_DIR}/{name}", caption))
    if scores is not None:
        best.per_class = _per_class_examples(scores, set(files))
    matrix = _read_confusion(report, root / CONFUSION_ARTIFACT)
    if matrix is not None:
        class_figures.confusion(
            matrix, report.out / "confusion.png", f"Confusion matrix, {row['label']}"
        )
        best.figures.append(
            Picture("confusion.png", "Row-normalised confusion matrix (rows: ground truth).")
        )
    iou = _iou_per_class(report, row, matrix)
    if iou:
        class_figures.iou_bars(
            iou, report.out / "iou_per_class.png", f"IoU per class, {row['label']}"
        )
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


def compose(data: SweepData, out: Path, weight: float, constraints: list[Constraint]) -> Report:
    """Every section of the report of `data`, its figures drawn into `out`."""
    # trained trials: not failed, nor ended before training by the sweep's tune.constraints
    trials = data.table[(data.table["status"] != FAILED) & (data.table["infeasible"] == "")]
    report = Report(data, out, weight, constraints)
    if constraints:  # checked against the sweep's metrics before anything is drawn
        report.within = within_constraints(trials, constraints, data.metric_columns)
    out.mkdir(parents=True, exist_ok=True)
    colors = figures.trial_colors(list(trials["label"]))
    _floor(report, trials)
    _reused(report)
    _best_trial(report, trials)
    _constraints(report, trials)
    _input_bound(report, trials)
    _curves(report, trials, colors)
    _pareto(report, trials, colors)
    _seeds(report, trials, colors)
    _importance(report, trials)
    # what the sweep's own tune.constraints kept from training, and why
    report.notes += excluded_lines(data.tracking_uri, data.table, data.sweeps["run_id"])
    for _, row in data.table[data.table["status"] == FAILED].iterrows():
        report.notes.append(
            f"failed trial {row['label']} (not plotted): {row['error'] or 'no error recorded'}"
        )
    return report
