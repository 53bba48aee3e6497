"""A sweep's tune.constraints on a real local Ray and a real MLflow store: what breaks them is
never trained, and every result carries its architecture's costs from the first epoch."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from segtune.config.constraints import parse_constraints
from segtune.config.names import COST_EXPERIMENT, EXCLUDED_ARTIFACT, INFEASIBLE_TAG
from segtune.config.sweep import validate_sweep
from segtune.errors import ConfigError
from segtune.sweep.optuna_search import CONSTRAINTS_ATTR
from segtune.sweep.space import param_space, resolve_trial
from tests.test_sweep import run, steps, trial_runs, write_sweep

MODELS = [
    {"arch": "unet", "backbone": "none"},  # the tiny UNet of TINY_TRAIN: 0.05 MB
    {"arch": "deeplabv3", "backbone": "mobilenet_v3_small"},  # 25 MB
]
SMALL = {"size_mb": "<=1"}
GPU_LIMITS = {"infer_ms_gpu": "<=5", "size_mb": "< 30"}
ARCHITECTURE_COSTS = ("params_m", "size_mb", "gflops", "infer_ms_cpu")


def ray_results(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Ray's own record of each trial's results, in order, by its trial folder's name."""
    return {
        path.parent.name: [json.loads(line) for line in path.read_text().splitlines()]
        for path in folder.glob("*/result.json")
    }


def test_constraint_violation_values() -> None:
    at_most, above = parse_constraints("size_mb<=30,infer_ms_cpu>2")
    assert at_most.violation(25.0) == -5.0 and at_most.violation(31.5) == 1.5
    assert above.violation(2.0) > 0  # at a strict bound: broken
    assert above.violation(None) == float("inf")


def test_a_sweep_file_takes_constraints_on_costs_it_measures() -> None:
    raw = {"name": "c", "tune": {"resources_per_trial": {"gpu": 1}, "constraints": GPU_LIMITS}}
    sweep = validate_sweep(raw)
    assert [str(c) for c in sweep.tune.constraint_list()] == ["infer_ms_gpu<=5", "size_mb<30"]
    with pytest.raises(ConfigError, match=r"infer_ms_gpu: no GPU latency .*\(bench.gpu is false\)"):
        validate_sweep({**raw, "bench": {"gpu": False}})


def test_a_random_sweep_draws_only_what_its_constraints_keep() -> None:
    """Ray's own variant generator on the space: every draw is feasible, and each grid value
    comes with the feasible choices only (no Ray started)."""
    from ray.tune.search.variant_generator import generate_variants

    sweep = validate_sweep(
        {
            "name": "r",
            "search_space": {
                "model": {"choice": MODELS},
                "augment": {"grid_search": ["none", "basic"]},
                "lr": {"loguniform": [0.001, 0.01]},
            },
            "tune": {"search": "random", "constraints": SMALL},
        }
    )
    space = param_space(sweep, keep=lambda cfg: cfg.arch == "unet")  # as the costs would say
    drawn = [
        resolve_trial(sweep, v["config"])
        for _ in range(5)
        for _, v in generate_variants({"config": space})
    ]
    assert {(cfg.arch, cfg.augment) for cfg in drawn} == {("unet", "none"), ("unet", "basic")}
    assert len({cfg.lr for cfg in drawn}) == len(drawn) == 10


def test_a_grid_never_trains_what_breaks_its_constraints(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Two architectures x two learning rates under size_mb<=1: the cost stage times both, the
    two DeepLab configurations never start (no trial run, no Ray trial), the summary and the
    report list them with their size, and each trial's first result already has its costs."""
    sweep = write_sweep(
        tmp_path / "grid_c.yaml",
        synthetic_root,
        search_space={"model": {"grid_search": MODELS}, "lr": {"grid_search": [0.003, 0.01]}},
        tune={"constraints": SMALL, "max_concurrent_trials": 2},
    )
    proc = run(sweep, report=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    costs = client.get_experiment_by_name(COST_EXPERIMENT)
    timed = client.search_runs([costs.experiment_id])
    assert len(timed) == 2  # both measured before the trials
    deeplab = next(r for r in timed if r.data.metrics["size_mb"] > 1)
    runs = trial_runs(tmp_path, "grid_c")
    assert sorted(r.data.params["arch"] for r in runs) == ["unet", "unet"]
    assert all(steps(tmp_path, r.info.run_id) == [0, 1] for r in runs)  # trained whole
    results = ray_results(tmp_path / "ray" / "grid_c")
    assert len(results) == 2  # Ray never had the others
    for r in runs:
        first = results[f"{r.info.run_name}_{r.data.tags['ray.trial_id']}"][0]
        assert first["training_iteration"] == 1 and "val_miou" in first
        for key in ARCHITECTURE_COSTS:
            assert first[key] == pytest.approx(r.data.metrics[key]), key
    size = f"{deeplab.data.metrics['size_mb']:.4g}"
    listed = re.findall(
        rf"^not trained \(tune\.constraints\): (deeplabv3-\S+): size_mb={size} breaks size_mb<=1$",
        proc.stdout,
        re.M,
    )
    assert sorted(listed) == [
        "deeplabv3-mobilenet_v3_small-aspp-basic-lr=0.003",
        "deeplabv3-mobilenet_v3_small-aspp-basic-lr=0.01",
    ], proc.stdout
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    kept = Path(client.download_artifacts(parent.info.run_id, EXCLUDED_ARTIFACT, str(tmp_path)))
    assert sorted(e["label"] for e in json.loads(kept.read_text())) == sorted(listed)
    page = (tmp_path / "reports" / "grid_c" / "index.html").read_text()
    for label in listed:
        assert f"not trained (tune.constraints): {label}: size_mb={size}" in page


@pytest.mark.parametrize(
    "sampler",
    # whole Optuna sweeps, 20-40 s each: make test-cluster (make test's 12 min)
    [pytest.param(s, marks=pytest.mark.launch) for s in ("tpe", "nsga2")],
)
def test_optuna_learns_the_constraints_and_trains_no_infeasible_trial(
    synthetic_root: Path, tmp_path: Path, sampler: str
) -> None:
    """Optuna samples both architectures; a sampled DeepLab ends at once as a run tagged
    segtune.infeasible with its costs and no epoch, and its constraint value (over 0) is on its
    Optuna trial, where the sampler's constraints_func reads it. NSGA-II optimises mIoU
    against CPU latency, which every result carries from the first epoch."""
    tune: dict[str, Any] = {"search": "optuna", "sampler": sampler, "num_samples": 6}
    if sampler == "nsga2":
        tune.update(metric=["val_miou", "infer_ms_cpu"], mode=["max", "min"])
    name = f"optuna_c_{sampler}"
    sweep = write_sweep(
        tmp_path / f"{name}.yaml",
        synthetic_root,
        train={"epochs": 1},
        search_space={"model": {"choice": MODELS}, "lr": {"loguniform": [0.001, 0.01]}},
        tune={**tune, "constraints": SMALL},
    )
    proc = run(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = trial_runs(tmp_path, name)
    assert len(runs) == 6
    infeasible = [r for r in runs if INFEASIBLE_TAG in r.data.tags]
    trained = [r for r in runs if INFEASIBLE_TAG not in r.data.tags]
    assert infeasible and trained, [r.data.params["arch"] for r in runs]
    for r in infeasible:
        assert r.data.params["arch"] == "deeplabv3" and r.info.status == "FINISHED"
        assert r.data.metrics["size_mb"] > 1 and r.data.metrics["infer_ms_cpu"] > 0
        assert re.fullmatch(r"size_mb=\d+(\.\d+)? breaks size_mb<=1", r.data.tags[INFEASIBLE_TAG])
        assert steps(tmp_path, r.info.run_id) == [] and "best_val_miou" not in r.data.metrics
        assert f"infeasible, ended before its first epoch: {r.info.run_name}" in proc.stdout
    for r in trained:
        assert r.data.params["arch"] == "unet" and steps(tmp_path, r.info.run_id) == [0]
    # the summary's rows are the trained trials only
    table = [line for line in proc.stdout.splitlines() if re.search(r" (True|False)\b", line)]
    assert len(table) == len(trained)
    # Ray's saved searcher: each Optuna trial holds its constraint value, over 0 where broken
    (state,) = (tmp_path / "ray" / name).glob("searcher-state-*.pkl")
    study = pickle.loads(state.read_bytes())["_ot_study"]
    by_arch: dict[int, list[float]] = {}
    for trial in study.trials:
        assert trial.state.name == "COMPLETE", trial
        by_arch.setdefault(trial.params["model"], []).extend(trial.user_attrs[CONSTRAINTS_ATTR])
        assert trial.system_attrs["constraints"] == tuple(trial.user_attrs[CONSTRAINTS_ATTR])
    assert all(v <= 0 for v in by_arch[0]) and all(v > 0 for v in by_arch[1]), by_arch
    first = {k: v[0] for k, v in ray_results(tmp_path / "ray" / name).items()}
    assert len(first) == 6
    assert all(all(key in result for key in ARCHITECTURE_COSTS) for result in first.values())


def test_a_sweep_that_its_constraints_leave_empty_ends_in_one_line(
    synthetic_root: Path, tmp_path: Path
) -> None:
    sweep = write_sweep(
        tmp_path / "none_left.yaml",
        synthetic_root,
        search_space={"model": {"grid_search": MODELS[1:]}},
        tune={"constraints": SMALL},
    )
    proc = run(sweep)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = "tune.constraints: every configuration of the sweep breaks them (1; e.g. deeplabv3-"
    assert line in proc.stderr and "Traceback" not in proc.stderr
    assert trial_runs(tmp_path, "none_left") == []
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("none_left").experiment_id
    (parent,) = client.search_runs([experiment])
    assert parent.info.status == "FAILED" and line in parent.data.tags["segtune.error"]


@pytest.mark.launch  # two drivers in turn: make test-cluster (make test's 12 min)
def test_trials_that_accept_changes_adds_obey_the_constraints(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """A finished grid under size_mb<=1 gains a UNet at another lr and a DeepLab: `--resume
    --accept-changes` trains the UNet only (Ray's added experiment never has the DeepLab),
    and the sweep run lists the DeepLab as not trained, as it lists its own."""
    sweep = write_sweep(
        tmp_path / "added_c.yaml",
        synthetic_root,
        train={"epochs": 1},
        search_space={"model": {"grid_search": MODELS[:1]}},
        tune={"constraints": SMALL},
    )
    proc = run(sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    raw = yaml.safe_load(sweep.read_text())
    raw["search_space"]["model"]["grid_search"] += [{**MODELS[0], "lr": 0.01}, MODELS[1]]
    sweep.write_text(yaml.safe_dump(raw))
    proc = run(sweep, "--resume", "--accept-changes")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--accept-changes: 2 trial(s) added to sweep added_c" in proc.stderr
    runs = trial_runs(tmp_path, "added_c")
    assert sorted((r.data.params["arch"], r.data.params["lr"]) for r in runs) == [
        ("unet", "0.003"),
        ("unet", "0.01"),
    ]
    assert all(steps(tmp_path, r.info.run_id) == [0] for r in runs)
    assert len(ray_results(tmp_path / "ray" / "added_c" / "added-1")) == 1
    listed = re.findall(
        r"^not trained \(tune\.constraints\): (deeplabv3-\S+): size_mb=\S+ breaks size_mb<=1$",
        proc.stdout,
        re.M,
    )
    assert len(listed) == 1, proc.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = runs[0].data.tags["mlflow.parentRunId"]
    kept = Path(client.download_artifacts(parent, EXCLUDED_ARTIFACT, str(tmp_path)))
    assert [e["label"] for e in json.loads(kept.read_text())] == listed
    assert client.get_run(parent).info.status == "FINISHED"
