"""`python -m segtune.bench`: the cost table of the models and the engine-overhead benchmark."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segtune.cli import run_cli
from segtune.config.trial import trial_config
from segtune.models.cost import count_params

REPO = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segtune.bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # over 10 s on 2 cores: make test, not make check
def test_cli_models_prints_the_filtered_table(tmp_path: Path) -> None:
    from segtune.models import build_model, model_variants

    wanted = [
        v
        for v in model_variants()
        if (v["arch"], v["backbone"]) == ("deeplabv3", "mobilenet_v3_small")
    ]
    assert wanted, "the registry has no deeplabv3 + mobilenet_v3_small"
    out_csv = tmp_path / "cost.csv"
    result = run_bench(
        "models",
        "--arch", "deeplabv3",
        "--backbone", "mobilenet_v3_small",
        "--input", "64x48",
        "--repeats", "2",
        "--warmup", "1",
        "--threads", "1",
        "--csv", str(out_csv),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    header, columns, rows = lines[0], lines[1].split(), lines[2:]
    assert header.startswith("# torch ") and "input 64x48" in header and " 1 of " in header
    assert "GPU" in header
    assert columns == ["model", "params_m", "size_mb", "gflops", "infer_ms_cpu", "infer_ms_gpu"]
    labels = [trial_config(v).model_label() for v in wanted]
    assert sorted(row.split()[0] for row in rows) == sorted(labels)
    assert result.stderr.count(f"/{len(wanted)}] deeplabv3-mobilenet_v3_small") == len(wanted)

    with out_csv.open() as f:
        records = {r["model"]: r for r in csv.DictReader(f)}
    assert sorted(records) == sorted(labels)
    for variant in wanted:
        record = records[trial_config(variant).model_label()]
        expected = count_params(build_model(variant))
        assert float(record["params_m"]) == pytest.approx(expected)
        assert float(record["infer_ms_cpu"]) > 0
        assert record["bench_input"] == "64x48"
        if NO_GPU:
            assert record["infer_ms_gpu"] == ""
            assert record["gpu_skip_reason"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "1000by750"], "invalid input size '1000by750'"),
        (["--arch", "nosuchnet"], "no model variant matches --arch nosuchnet"),
        (["--threads", "0"], "invalid --threads 0"),
    ],
)
def test_cli_bad_options_give_one_error_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from segtune.bench import main

    assert run_cli(main, ["models", *args]) == 2  # as `python -m segtune.bench` exits
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("error: ") and message in err
    assert out == ""


@pytest.mark.slow  # over 10 s on 2 cores: make test, not make check
def test_engine_overhead_compares_fit_with_a_bare_loop() -> None:
    from segtune.training.overhead import engine_overhead

    # three alternations: their medians leave out a pair that a first call's one-time costs, or
    # another process of a shared machine, slowed (one alternation once gave a ratio of 31)
    result = engine_overhead("deeplabv3", "mobilenet_v3_small", 32, 2, 4, 3, "cpu")
    assert result["bare_img_s"] > 0 and result["engine_img_s"] > 0
    # the same work: a fit() several times slower or faster than the bare loop is a broken one
    assert 0.2 < result["ratio"] < 5


@pytest.mark.launch  # a whole sweep, 45 s: make test-cluster, and CI
def test_cli_sweep_prints_the_time_account(synthetic_root: Path, tmp_path: Path) -> None:
    """`bench sweep` runs the sweep as `python -m segtune.run` does, in a store of its own, and
    prints each run's time account read back from its sweep run, with the median."""
    from tests.test_sweep import write_sweep

    sweep = write_sweep(tmp_path / "timed.yaml", synthetic_root, train={"epochs": 1})
    result = run_bench("sweep", str(sweep), "--repeats", "1", "--cold", "--set", "train.lr=0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "cost table empty each run" in lines[0] and "train.lr=0.01" in lines[0]
    header, first, median = lines[1].split(), lines[2].split(), lines[3].split()
    assert header[:4] == ["run", "load", "outside", "s"] and "efficiency" in header
    assert first[0] == "1" and median[0] == "median" and first[1:] == median[1:]
    assert sum(v.endswith("%") for v in first) == 1  # the efficiency
    assert not list(tmp_path.glob("mlflow.db")), "the benchmark keeps to its own store"


def test_a_commands_wall_time_starts_with_its_process() -> None:
    """The time account's wall seconds: at least the time the process slept, and never more
    than its parent saw pass, give or take the one clock tick (10 ms) that /proc counts a
    start in (psutil's create_time, built on a whole-second boot time, read up to a second
    too much)."""
    probe = (
        "import time; time.sleep(1.5); from segtune.cli import process_age; print(process_age())"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    outside = time.perf_counter() - started
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert 1.5 <= float(done.stdout) <= outside + tick, (done.stdout, outside)
