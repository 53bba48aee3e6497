"""The dashboards package against real MLflow: a sqlite store and a real `mlflow server` process.

The sweep is written with segtune.tracking's contract helpers (tests/dash_sweep.py), the report
is read back from MLflow only, and a headless Chromium checks that the page really renders.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from dashboards.analysis import compare_configs, ema, seed_groups, smoothing_points
from dashboards.page import linked
from dashboards.report import build_report, main
from dashboards.tables import FILES
from segtune.classes import CLASS_NAMES
from segtune.cli import run_cli
from segtune.config.constraints import parse_constraints
from segtune.config.names import OBJECTIVE
from segtune.errors import ConfigError
from segtune.tracking.query import TrackingError, load_sweep_table
from segtune.tracking.select import pareto_front
from tests.recorded_sweep import Spec, log_sweep, newest_specs, older_specs
from tests.servers import mlflow_server

EXPERIMENT = "tiny-sweep"
FIGURES = (
    "train_loss.png",
    "val_loss.png",
    "val_miou.png",
    "pareto_train_time_min.png",
    "pareto_infer_ms_cpu.png",
    "size_mb.png",
    "seeds_best_val_miou.png",
    "seeds_val_miou.png",
    "confusion.png",
    "iou_per_class.png",
)


@dataclass
class Store:
    uri: str
    old_parent: str
    old_runs: list[str]
    parent: str
    runs: list[str]  # newest sweep, in newest_specs() order


def _fill(uri: str, tmp: Path) -> Store:
    client = MlflowClient(tracking_uri=uri)
    old_parent, old_runs = log_sweep(client, EXPERIMENT, "old", older_specs(), tmp, seed=1)
    time.sleep(0.01)  # the newest sweep starts strictly later
    parent, runs = log_sweep(client, EXPERIMENT, "new", newest_specs(), tmp)
    return Store(uri, old_parent, old_runs, parent, runs)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    tmp = tmp_path_factory.mktemp("dash_sqlite")
    return _fill(f"sqlite:///{tmp}/mlflow.db", tmp)


@pytest.fixture(scope="module")
def report(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dash_report") / "report"
    return build_report(EXPERIMENT, store.uri, out=out, constraints="infer_ms_cpu<=50")


def _figure_trials(page: str) -> dict[str, list[str]]:
    """Which trials each <figure> of the page shows (its data-trials attribute)."""
    found = re.findall(
        r'<figure data-trials="([^"]*)">(?:(?!</figure>).)*?<img src="([^"]+)"', page, re.S
    )
    return {src: trials.split("|") for trials, src in found}


# --- the numbers ---------------------------------------------------------------------------


def test_ema_is_debiased() -> None:
    assert np.allclose(ema([1.0, 0.0, 0.0], 0.5), [1.0, 1 / 3, 1 / 7])
    assert np.allclose(ema([3.0, 1.0], 0.0), [3.0, 1.0])
    assert np.allclose(ema([2.0, np.nan, 2.0], 0.6), [2.0, 2.0, 2.0])


def _dominance_front(rows: list[tuple[float, ...]], maximise: list[bool]) -> list[bool]:
    """Independent O(n^2) check: a row is on the front when no complete row dominates it."""
    flags = []
    for i, a in enumerate(rows):
        if any(np.isnan(a)):
            flags.append(False)
            continue
        dominated = False
        for j, b in enumerate(rows):
            if i == j or any(np.isnan(b)):
                continue
            pairs = list(zip(a, b, maximise, strict=True))
            no_worse = all((bk >= ak) if up else (bk <= ak) for ak, bk, up in pairs)
            better = any((bk > ak) if up else (bk < ak) for ak, bk, up in pairs)
            dominated |= no_worse and better
        flags.append(not dominated)
    return flags


@pytest.mark.parametrize("n_costs", [1, 2])
def test_pareto_front_equals_a_dominance_check(n_costs: int) -> None:
    rng = np.random.default_rng(n_costs)
    for _ in range(20):
        n = int(rng.integers(1, 25))
        values = rng.integers(0, 6, (n, 1 + n_costs)).astype(float)  # small ints: many ties
        values[rng.random(values.shape) < 0.1] = np.nan
        costs = [f"c{k}" for k in range(n_costs)]
        df = pd.DataFrame(values, columns=["miou", *costs], index=rng.permutation(100)[:n])
        modes = {"c1": "max"} if n_costs == 2 else None
        got = pareto_front(df, "miou", costs, modes)
        want = _dominance_front(
            [tuple(r) for r in values], [True, False, True] if n_costs == 2 else [True, False]
        )
        assert got.index.equals(df.index)
        assert got.tolist() == want


def test_pareto_front_on_the_sweep(store: Store) -> None:
    table = load_sweep_table(EXPERIMENT, store.uri)
    finished = table[table["status"] != "FAILED"]
    for cost in ("train_time_min", "infer_ms_cpu"):
        got = pareto_front(finished, OBJECTIVE, [cost])
        rows = list(finished[[OBJECTIVE, cost]].itertuples(index=False, name=None))
        assert got.tolist() == _dominance_front(rows, [True, False])
    front = finished.loc[pareto_front(finished, OBJECTIVE, ["train_time_min"]), "run_name"]
    assert sorted(front) == ["deeplabv3-mobilenet_v3_small-aspp-basic", "unet-none-basic-s1"]


def test_constraints_parsing() -> None:
    parsed = parse_constraints("infer_ms_cpu<=50, size_mb < 2e1,best_val_miou>=0.2")
    assert [(c.column, c.op, c.value) for c in parsed] == [
        ("infer_ms_cpu", "<=", 50.0),
        ("size_mb", "<", 20.0),
        ("best_val_miou", ">=", 0.2),
    ]
    for bad in ("infer_ms_cpu=50", "infer_ms_cpu<=fast", "", "a<1,,b<2", "<=3"):
        with pytest.raises(ConfigError, match="--constraints"):
            parse_constraints(bad)


def test_seed_comparisons_say_whether_a_difference_exceeds_the_spread() -> None:
    table = pd.DataFrame(
        {
            "run_id": list("abcdefgh"),
            "config": ["x=1"] * 2 + ["x=2"] * 2 + ["x=3"] * 2 + ["x=1"] * 2,
            "config_label": ["one"] * 2 + ["two"] * 2 + ["three"] * 2 + ["one"] * 2,
            OBJECTIVE: [0.50, 0.52, 0.49, 0.53, 0.30, 0.31, 0.05, 0.10],
            # a failed seed and one a scheduler stopped early count in no seed statistic
            "status": ["FINISHED"] * 6 + ["FAILED", "FINISHED"],
            "early_stopped": [""] * 7 + ["after 1 epochs"],
        }
    )
    groups = seed_groups(table)
    assert groups["label"].tolist() == ["one", "two", "three"]
    assert groups["n"].tolist() == [2, 2, 2]
    assert groups["runs"].iloc[0] == ["a", "b"]
    verdicts = {(c.a, c.b): c.beyond_spread for c in compare_configs(groups)}
    assert verdicts == {("one", "two"): False, ("one", "three"): True, ("two", "three"): True}
    # a metric no trial has a value of (GPU latency on CPUs): no groups, no comparisons
    empty = seed_groups(table.assign(infer_ms_gpu=float("nan")), "infer_ms_gpu")
    assert empty.empty and compare_configs(empty) == []


# --- reading MLflow -------------------------------------------------------------------------


def test_table_has_one_row_per_trial_of_the_newest_sweep(store: Store) -> None:
    table = load_sweep_table(EXPERIMENT, store.uri)
    assert sorted(table["run_id"]) == sorted(store.runs)
    assert set(table["sweep_run_id"]) == {store.parent}
    failed = table[table["status"] == "FAILED"]
    assert failed["run_name"].tolist() == ["deeplabv3-vgg11_bn-aspp-basic"]
    assert failed["error"].iloc[0].startswith("TrainingDiverged")
    assert "infer_ms_gpu" not in table.columns  # never invented
    assert table["label"].is_unique
    assert {"unet-none-none seed=0", "unet-none-none seed=1"} <= set(table["label"])
    # the two seeds of a configuration share its config key and name; other params differ
    for name in ("unet-none-none", "unet-none-basic"):
        seeds = table[table["config_label"] == name]
        assert seeds["config"].nunique() == 1 and seeds["params.seed"].tolist() == ["0", "1"]
    assert table.loc[table["config_label"] == "unet-none-basic", "label"].tolist() == [
        "unet-none-basic-s0",
        "unet-none-basic-s1",
    ]
    assert table["config"].nunique() == 5
    assert (
        table.set_index("run_name").loc["deeplabv3-mobilenet_v3_small-aspp-basic", OBJECTIVE]
        == 0.27
    )


def test_csv_tables_hold_each_trial_and_the_seed_spread(tmp_path: Path) -> None:
    """`--csv DIR`: every trial with its class IoUs at its best epoch (not its last), each
    configuration's seeds, mean and std, and the comparisons, as the report's analysis has them."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    _, runs = log_sweep(client, "csv", "new", newest_specs(), tmp_path)
    finished = [r for r in runs if client.get_run(r).info.status == "FINISHED"]
    client.log_metric(finished[0], "best_epoch", 1)  # the best epoch is not the last one here
    out = tmp_path / "csv"
    argv = ["--experiment", "csv", "--tracking-uri", uri, "--out", str(tmp_path / "report")]
    assert main([*argv, "--no-log", "--csv", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)

    trials = pd.read_csv(out / "trials.csv").set_index("run_id")
    assert sorted(trials.index) == sorted(runs)
    history = client.get_metric_history(finished[0], "val_iou_vehicle")
    at_best = next(m.value for m in history if m.step == 1)
    assert trials.loc[finished[0], "best_iou_vehicle"] == pytest.approx(at_best)
    assert at_best != pytest.approx(max(history, key=lambda m: m.step).value)

    configs = pd.read_csv(out / "configurations.csv")
    row = configs[(configs["label"] == "unet-none-none") & (configs["metric"] == OBJECTIVE)]
    seeds = trials.loc[trials["config_label"] == "unet-none-none", OBJECTIVE]
    assert row["n"].item() == 2 == len(seeds)
    assert row["mean"].item() == pytest.approx(seeds.mean())
    assert row["std"].item() == pytest.approx(seeds.std(ddof=1))
    assert set(row["runs"].item().split()) == set(seeds.index)

    pairs = pd.read_csv(out / "comparisons.csv")
    expected = compare_configs(seed_groups(trials.reset_index()))
    ours = pairs[pairs["metric"] == OBJECTIVE]
    assert list(zip(ours["a"], ours["b"], ours["beyond_spread"], strict=True)) == [
        (c.a, c.b, c.beyond_spread) for c in expected
    ]
    curves = pd.read_csv(out / "curves.csv")
    assert set(curves["run_id"]) == set(runs) and "val_miou" in set(curves["key"])


def test_run_id_and_all_choose_sweeps(store: Store) -> None:
    old = load_sweep_table(EXPERIMENT, store.uri, sweep_run_id=store.old_parent)
    assert sorted(old["run_id"]) == sorted(store.old_runs)
    both = load_sweep_table(EXPERIMENT, store.uri, all_sweeps=True)
    assert sorted(both["run_id"]) == sorted(store.old_runs + store.runs)
    assert both["label"].is_unique  # unet-none-none of both sweeps told apart
    with pytest.raises(TrackingError, match="not a sweep run"):
        load_sweep_table(EXPERIMENT, store.uri, sweep_run_id=store.runs[0])


# --- the report -----------------------------------------------------------------------------


def test_report_draws_every_figure(report: Path) -> None:
    for name in FIGURES:
        path = report.parent / name
        assert path.is_file() and path.stat().st_size > 1000, name
    assert not (report.parent / "pareto_infer_ms_gpu.png").exists()
    page = report.read_text()
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert not src.startswith(("/", "http", "data:")), src  # relative links
        assert (report.parent / src).is_file(), src


def test_report_tables_notes_and_verdicts(report: Path, store: Store) -> None:
    page = report.read_text()
    summary = page.split('<table id="summary">')[1].split("</table>")[0]
    assert sorted(re.findall(r'data-run-id="(\w+)"', summary)) == sorted(store.runs)
    titles = re.findall(r'data-run-id="\w+" title="([^"]*)"', summary)  # the row's hover text
    assert len(titles) == len(store.runs)
    assert all("arch=" in t and "seed=" in t and "lr=0.001" in t for t in titles), titles[0]
    assert "TrainingDiverged: loss became NaN" in summary
    assert "no trial has `infer_ms_gpu`" in page
    assert "left out for want of a value: deeplabv3-resnet18-aspp-basic" in page
    assert "Best trial: unet-none-basic-s1" in page
    # the one trial that waited for its data over 20% of its epochs, with what to change
    assert re.search(
        r"Input-bound trials \(waited for data more than 20% [^)]*\): "
        r"deeplabv3-mobilenet_v3_small-aspp-basic 45%; try more cpu per trial, data\.cache",
        page,
    ), page
    assert "Best within the constraints infer_ms_cpu&lt;=50: deeplabv3-mobilenet_v3_small" in page
    assert re.search(r"unet-none-basic vs unet-none-none \(differ in augment\).*larger than", page)
    assert f"mlflow ui --backend-store-uri {store.uri}" in page
    # the floor first, with the trials that do not beat it (the diverged trial is not plotted)
    floor_line = page.split("<h2>Summary</h2><ul>")[1].split("</li>")[0]
    assert "Colour-only floor" in floor_line and "best_val_miou 0.200" in floor_line
    assert "(1 of 6): unet-none-none seed=0." in floor_line, floor_line  # 0.20 is not above it
    # a failed trial is in the table, not in the plots; a trial without CPU latency not in that plot
    shown = _figure_trials(page)
    assert set(shown) >= {"train_loss.png", "pareto_infer_ms_cpu.png", "size_mb.png"}
    assert all("deeplabv3-vgg11_bn-aspp-basic" not in trials for trials in shown.values())
    assert "deeplabv3-resnet18-aspp-basic" not in shown["pareto_infer_ms_cpu.png"]
    assert len(shown["train_loss.png"]) == 6
    assert sorted(shown["pareto_train_time_min.png"]) == sorted(shown["train_loss.png"])


def test_report_per_class_examples(report: Path, store: Store) -> None:
    page = report.read_text()
    per_class = page.split('<table id="per-class">')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>(\w+)</td>(.*?)</tr>", per_class)
    assert [name for name, _ in rows] == list(CLASS_NAMES)
    cells = dict(rows)
    assert cells["vehicle"].count("None (class absent)") == 2
    scores = pd.read_csv(report.parent / "best/eval/per_image.csv", dtype={"id": str}).set_index(
        "id"
    )
    worst = scores["iou_building"].idxmin()
    assert f"{worst}: IoU {scores['iou_building'].min():.3f}" in cells["building"]
    assert f"best/eval/examples/class_building_worst_{worst}.png" in cells["building"]
    assert "<img" not in cells["road"]  # no composite logged for road: text only
    for kind in ("best_1_", "worst_1_"):
        assert re.search(rf'src="best/eval/examples/{kind}\w+\.png"', page)


def test_report_is_logged_to_the_sweep_run(report: Path, store: Store, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=store.uri)
    logged = {Path(f.path).name for f in client.list_artifacts(store.parent, "report")}
    assert {"index.html", *FIGURES} <= logged
    page = Path(client.download_artifacts(store.parent, "report/index.html", str(tmp_path)))
    srcs = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # Plotly's script travels inside the logged page, not as an artifact of its own
    assert '<script src="data:text/javascript;base64,' in page.read_text()
    assert "plotly.min.js" not in logged


def test_all_sweeps_report(store: Store, tmp_path: Path) -> None:
    index = build_report(EXPERIMENT, store.uri, out=tmp_path / "all", all_sweeps=True, ema=0.0)
    summary = index.read_text().split('<table id="summary">')[1].split("</table>")[0]
    assert len(re.findall(r"data-run-id=", summary)) == len(store.runs) + len(store.old_runs)
    client = MlflowClient(tracking_uri=store.uri)
    names = {Path(f.path).name for f in client.list_artifacts(store.parent, "report/all-sweeps")}
    assert "index.html" in names


def test_no_trial_within_the_constraints(store: Store, tmp_path: Path) -> None:
    index = build_report(
        EXPERIMENT, store.uri, out=tmp_path, constraints="size_mb<1", log_to_mlflow=False
    )
    assert "No trial is within the constraints size_mb&lt;1." in index.read_text()


# --- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--constraints", "latency fast"], "--constraints 'latency fast': cannot read"),
        (["--budget", "infer_ms_tpu<=5"], "no metric 'infer_ms_tpu'"),  # the former name
        (["--ema", "1.5"], "--ema 1.5"),
        (["--run-id", "0" * 32], "no such MLflow run"),
        (["--tracking-uri", "foo://bar"], "MLflow has no store for foo://"),
    ],
)
def test_cli_errors_are_one_line(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["--experiment", EXPERIMENT, "--tracking-uri", store.uri, "--out", str(tmp_path)]
    assert run_cli(main, [*argv, "--no-log", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_an_output_folder_under_a_file_is_one_line(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").write_text("mine")
    out = tmp_path / "taken" / "report"
    argv = ["--experiment", EXPERIMENT, "--tracking-uri", store.uri, "--out", str(out), "--no-log"]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {out}: {tmp_path / 'taken'} is a file, not a folder"


def test_cli_unknown_experiment(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--tracking-uri", store.uri, "--experiment", "nope", "--out", str(tmp_path)]
    assert run_cli(main, argv) == 2  # as `python -m dashboards.report` exits
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: experiment 'nope' not found")
    assert "Traceback" not in err


@pytest.mark.slow  # over 10 s on 2 cores: make test, not make check
def test_run_id_from_standard_input_once_imported(store: Store, tmp_path: Path) -> None:
    """segtune.run starts its report this way, ahead of the sweep's end: the report asks for
    the run id only once everything is imported (torch never is), then draws that sweep."""
    command = [sys.executable, "-m", "dashboards.report", "--tracking-uri", store.uri,
               "--experiment", EXPERIMENT, "--out", str(tmp_path / "old"), "--no-log",
               "--run-id", "-"]  # fmt: skip
    cwd = Path(__file__).parents[1]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          cwd=cwd) as report:  # fmt: skip
        assert report.stdout is not None and report.stdout.readline() == "sweep run id:\n"
        out, _ = report.communicate(store.old_parent + "\n", timeout=120)
    assert report.returncode == 0
    page = Path(out.strip().splitlines()[-1]).read_text()
    assert all(run in page for run in store.old_runs)
    assert not any(run in page for run in store.runs)
    ended = subprocess.run(command, input="", capture_output=True, text=True, cwd=cwd, timeout=120)
    assert ended.returncode == 2
    assert ended.stderr.strip() == "error: --run-id -: standard input ended before a run id"
    probe = "import sys, dashboards.report; print(sorted(m for m in sys.modules if 'torch' in m))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd)
    assert done.stdout.strip() == "[]", "the report imports torch (3 s) for nothing"


def test_experiment_without_sweep(store: Store, tmp_path: Path) -> None:
    MlflowClient(tracking_uri=store.uri).create_experiment("no-sweeps-here")
    with pytest.raises(TrackingError, match="'no-sweeps-here' has no sweep run"):
        build_report("no-sweeps-here", store.uri, out=tmp_path)


# --- a real browser ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.rows =
    document.querySelectorAll('#summary tbody tr[data-run-id]').length;
  // every point Plotly drew: the plot it is in, its hover text and its link
  const points = [];
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    for (const trace of plot.data) {
      (trace.hovertext || []).forEach((text, i) =>
        points.push([plot.id, text, (trace.customdata || [])[i]]));
    }
  }
  const out = document.createElement('pre');
  out.id = 'points';
  out.textContent = JSON.stringify(points);
  document.body.appendChild(out);
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--virtual-time-budget=5000",
    ]
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=True
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report: Path, store: Store, tmp_path: Path) -> None:
    probe = report.parent / "browser_probe.html"  # beside index.html: same relative links
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp_path, "--dump-dom", probe.as_uri()).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(1)))
    n_images = len(re.findall(r"<img ", report.read_text()))
    assert int(attrs["images"]) == n_images > len(FIGURES)
    assert attrs["loaded"] == attrs["images"]  # every image decoded: naturalWidth > 0
    assert int(attrs["rows"]) == len(store.runs)
    # offline (Plotly's script is a file beside the page), every plotted trial is a point that
    # names it on hover and links to its run: the run id on a sqlite store
    points = json.loads(html.unescape(re.search(r'<pre id="points">(.*?)</pre>', dom).group(1)))
    table = load_sweep_table(EXPERIMENT, store.uri)
    finished = table[table["status"] != "FAILED"]
    for plot in ("plot-pareto_train_time_min", "plot-pareto_infer_ms_cpu"):
        found = {(text.split("<br>")[0], link) for where, text, link in points if where == plot}
        expected = {
            (f"<b>{row.label}</b>", row.run_id)
            for row in finished.itertuples()
            if plot.endswith("time_min") or pd.notna(row.infer_ms_cpu)
        }
        assert found == expected, plot
    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert shot.stat().st_size > 10_000


# --- a real tracking server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `mlflow server` on 127.0.0.1 for the module, serving artifacts itself."""
    with mlflow_server(tmp_path_factory.mktemp("dash_server")) as url:
        yield url


def test_importance_ranks_the_key_that_matters_first(store: Store, tmp_path: Path) -> None:
    """An Optuna-like sweep over lr and batch_size where only lr moves the result: Optuna puts
    lr first, and the report draws the importance bars and the parallel coordinates."""
    rng = np.random.default_rng(3)
    specs = []
    for i in range(12):
        lr = float(10 ** rng.uniform(-4, -2))
        keys = {"arch": "unet", "lr": lr, "batch_size": int(rng.choice([4, 8, 16])), "seed": 0}
        miou = 0.45 - 0.08 * (np.log10(lr) + 3) ** 2
        specs.append(Spec(keys, miou, {"train_time_min": 1.0 + i / 10, "size_mb": 10.0}))
    log_sweep(MlflowClient(tracking_uri=store.uri), "hpo-like", "hpo", specs, tmp_path)
    index = build_report("hpo-like", store.uri, out=tmp_path / "report", log_to_mlflow=False)
    page = index.read_text()
    line = re.search(
        r"What mattered for best_val_miou \(.*? over 12 finished trials.*?\): (.*?)\.</li>", page
    )
    assert line, page[:2000]
    ranking = [(key, float(share)) for key, share in re.findall(r"(\w+) ([\d.]+)", line.group(1))]
    assert [key for key, _ in ranking] == ["lr", "batch_size"]
    assert ranking[0][1] > 0.8 and abs(sum(share for _, share in ranking) - 1) < 0.02
    for name in ("importance.png", "parallel_coordinates.png"):
        assert (index.parent / name).stat().st_size > 5000, name
        assert f'id="plot-{name[:-4]}"' in page


def test_report_against_a_tracking_server(server: str, tmp_path: Path) -> None:
    store = _fill(server, tmp_path)
    index = build_report(EXPERIMENT, server, out=tmp_path / "report")
    page = index.read_text()
    for name in FIGURES:
        assert (index.parent / name).stat().st_size > 1000, name
    client = MlflowClient(tracking_uri=server)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = f"{server}/#/experiments/{experiment_id}/runs/"
    for run_id in store.runs:
        assert f'href="{runs}{run_id}"' in page  # the table's link
    for run_id in store.runs[:-1]:  # the last trial failed: it has no point
        link = f'"customdata":["{runs}{run_id}"]'.replace("/", "\\u002f")  # Plotly's JSON
        assert link in page  # the point's link
    assert "mlflow ui --backend-store-uri" not in page
    # the sweep's trials in MLflow's UI: the link opens them listed (not folded under their
    # sweep's row), only this sweep's, as headless Chromium sees the page
    link = html.unescape(re.search(r'The runs in MLflow: <a href="([^"]+)"', page).group(1))
    assert link.startswith(f"{server}/#/experiments/{experiment_id}/runs?")
    assert f"parentRunId%20%3D%20%27{store.parent}%27" in link
    if CHROMIUM is not None:
        dom = _chromium(tmp_path, "--dump-dom", link).stdout
        names = {client.get_run(run_id).info.run_name for run_id in store.runs}
        assert all(f">{name}<" in dom for name in names), names
        assert f"<strong>{len(store.runs)}</strong> matching runs" in dom
    logged = {Path(f.path).name for f in client.list_artifacts(store.parent, "report")}
    assert {"index.html", "pareto_train_time_min.png"} <= logged


def test_smoothing_follows_the_axis_and_needs_enough_points() -> None:
    """A validation loss falling from 10^4 to 1.5: in log space the smoothed line comes down
    with it (in linear space it would stay hundreds of times higher); a short series is not
    smoothed at all."""
    raw = [1e4, 30.0, 3.0, 1.6, 1.5, 1.5, 1.5, 1.5, 1.5]
    linear, logs = ema(raw, 0.6), ema(raw, 0.6, log=True)
    assert linear[-1] > 10 and logs[-1] < 2.0
    assert np.allclose(ema([10.0, 1000.0], 0.5, log=True), [10.0, 10 ** (7 / 3)])
    assert smoothing_points(0.6) == 8 and smoothing_points(0.9) == 30
    assert smoothing_points(0.0) == 0 and smoothing_points(0.1) == 5


def test_addresses_in_summary_lines_are_links_and_the_rest_is_escaped() -> None:
    """A warm start's reused run names its page: a link in the HTML, not text to copy."""
    page = "http://127.0.0.1:5000/#/experiments/1/runs/ab12?o=1&p=2"
    line = f"Reused from an earlier sweep (warm start): unet <b> (mIoU 0.500), {page}."
    assert linked(line) == (
        "Reused from an earlier sweep (warm start): unet &lt;b&gt; (mIoU 0.500), "
        f'<a href="{html.escape(page)}">{html.escape(page)}</a>.'
    )
    assert linked("no address, a & b") == "no address, a &amp; b"
    for mark in ("'", "!", "?", "]", ")"):  # the sentence's, not the address's
        assert (
            linked(f"see http://a.b/c{mark}")
            == f'see <a href="http://a.b/c">http://a.b/c</a>{html.escape(mark)}'
        )
