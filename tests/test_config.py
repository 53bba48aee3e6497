"""The sweep file schema: overrides, YAML's surprises, the search-space grammar."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from segtune.config.sweep import load_sweep
from segtune.config.trial import apply_overrides, format_hw, parse_hw, trial_config
from segtune.errors import ConfigError
from segtune.sweep.space import GRID_KEY, discrete_trials, param_space, resolve_trial


def test_yaml_off_means_amp_off(tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\ntrain: {amp: off}\n")  # YAML 1.1 reads a bare off as false
    assert trial_config(load_sweep(sweep).train).amp == "off"
    assert trial_config({"amp": True}).amp == "auto"


def test_overrides_are_typed_and_nested() -> None:
    raw = apply_overrides(
        {"train": {"lr": 0.1}}, ["train.lr=3e-4", "tune.resources_per_trial.gpu=0.5"]
    )
    assert raw["train"]["lr"] == 3e-4  # a float, not the string YAML 1.1 would make of it
    assert raw["tune"]["resources_per_trial"]["gpu"] == 0.5
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_groups_repeats_and_labels(tmp_path: Path) -> None:
    sweep_file = tmp_path / "g.yaml"
    sweep_file.write_text(
        "name: g\n"
        "train: {seed: 3}\n"
        "search_space:\n"
        "  model: {grid_search: [{arch: unet, backbone: none}, {arch: deeplabv3, backbone: resnet18, lr: 0.01}]}\n"
        "  augment: {grid_search: [none, basic]}\n"
        "tune: {repeats: 2}\n"
    )
    sweep = load_sweep(sweep_file)
    trials = discrete_trials(sweep)
    assert len(trials) == 8 and {t.seed for t in trials} == {3, 4}
    labels = {sweep.trial_label(t) for t in trials}
    assert "deeplabv3-resnet18-aspp-basic-lr=0.01-s4" in labels
    assert "unet-none-none-lr=0.001-s3" in labels
    configs = {sweep.config_label(t) for t in trials}  # the seeds of one configuration share it
    assert configs == {label.rsplit("-s", 1)[0] for label in labels} and len(configs) == 4
    # a group's key that takes one value in every configuration says nothing in a label
    sweep_file.write_text(
        "name: g\n"
        "train: {pretrained: none}\n"
        "search_space:\n"
        "  model: {grid_search: [{arch: unet, backbone: none, pretrained: none},"
        " {arch: deeplabv3, backbone: resnet18}]}\n"
    )
    same = load_sweep(sweep_file)
    assert [same.trial_label(t) for t in discrete_trials(same)] == [
        "unet-none-basic",
        "deeplabv3-resnet18-aspp-basic",
    ]
    assert same.searched_keys() == ["arch", "backbone"]
    # one grid dimension of whole combinations, in file order or longest first by an estimate
    grid = param_space(sweep)[GRID_KEY]["grid_search"]
    assert [resolve_trial(sweep, {GRID_KEY: c}) for c in grid] == trials
    ordered = param_space(sweep, duration=lambda cfg: cfg.lr * (1 + cfg.seed))
    estimates = [
        (cfg.lr * (1 + cfg.seed))
        for cfg in (resolve_trial(sweep, {GRID_KEY: c}) for c in ordered[GRID_KEY]["grid_search"])
    ]
    assert estimates == sorted(estimates, reverse=True) and len(estimates) == 8


def test_randint_is_inclusive(tmp_path: Path) -> None:
    sweep_file = tmp_path / "r.yaml"
    sweep_file.write_text(
        "name: r\nsearch_space: {batch_size: {randint: [2, 4]}}\ntune: {search: random}\n"
    )
    domain = param_space(load_sweep(sweep_file))["batch_size"]
    assert (domain.lower, domain.upper) == (2, 5)  # Ray's upper bound is exclusive


def test_task_sweeps_load_and_expand() -> None:
    root = Path(__file__).parent.parent / "sweeps"
    for path in sorted(root.glob("*.yaml")):
        sweep = load_sweep(path)
        space = param_space(sweep)
        assert space or sweep.train, path
    hpo = load_sweep(root / "hpo.yaml")
    assert param_space(hpo)["lr"].lower == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1000x750", (750, 1000)), ("64x48", (48, 64)), (" 32X16 ", (16, 32)), ("1x1", (1, 1))],
)
def test_parse_hw_reads_width_then_height(text: str, expected: tuple[int, int]) -> None:
    assert parse_hw(text) == expected
    assert parse_hw(format_hw(expected)) == expected


@pytest.mark.parametrize(
    "text", ["1000", "1000x", "x750", "axb", "0x10", "10x0", "-1x5", "2x3x4", ""]
)
def test_parse_hw_rejects_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError, match="WIDTHxHEIGHT|at least 1"):
        parse_hw(text)


def test_format_hw_writes_width_first() -> None:
    assert format_hw((750, 1000)) == "1000x750"
    with pytest.raises(ConfigError):
        format_hw((0, 10))


def test_model_label_drops_augment() -> None:
    assert trial_config({"arch": "unet", "backbone": "none"}).model_label() == "unet-none"
    deeplab = trial_config({"arch": "deeplabv3", "backbone": "resnet18", "augment": "strong"})
    assert deeplab.model_label() == "deeplabv3-resnet18-aspp"
    assert deeplab.label() == "deeplabv3-resnet18-aspp-strong"
    plus = trial_config({"arch": "deeplabv3plus", "backbone": "resnet18", "aspp": False})
    assert plus.model_label() == "deeplabv3plus-resnet18-noaspp"


def test_a_sweep_file_that_is_a_folder_or_not_text_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a folder, not a sweep file"):
        load_sweep(tmp_path)
    with pytest.raises(ConfigError, match="^/dev/null: a character device, not a sweep file"):
        load_sweep("/dev/null")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="a symlink to /dev/zero, a character device, not a"):
        load_sweep(tmp_path / "zero.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: sweep file not found$"):
        load_sweep(tmp_path / "nope.yaml")
    binary = tmp_path / "sweep.yaml"
    binary.write_bytes(b"\x80\x81name: x\n")
    with pytest.raises(ConfigError, match=r"sweep.yaml: not a text file in UTF-8 \(invalid start"):
        load_sweep(binary)


@pytest.mark.parametrize(
    ("tune", "line"),
    [  # a value no member of a union type takes is one problem, not one per member
        ({"mode": "maximize"}, "tune.mode: Input should be 'max' or 'min' (or: input should be a"),
        ({"metric": 5}, "tune.metric: Input should be a valid string (or: input should be a valid"),
        ({"mode": ["max", "up"]}, "tune.mode.1: Input should be 'max' or 'min'"),  # the list's
        ({"list": 1}, "tune.list: Extra inputs are not permitted"),  # a key, not a member
    ],
)
def test_a_value_of_a_union_type_is_one_problem(tune: dict[str, object], line: str) -> None:
    from segtune.config.sweep import validate_sweep

    with pytest.raises(ConfigError) as caught:
        validate_sweep({"name": "x", "tune": tune})
    assert str(caught.value).startswith(f"invalid sweep: {line}")
    assert "\n" not in str(caught.value)


RANDOM = {"search": "random"}


@pytest.mark.parametrize(
    ("key", "spec", "line"),
    [  # each value and bound against the trial key's own field: one line each, its key path
        (
            "lr",
            {"loguniform": [1e-4, math.inf]},
            "lr.loguniform[1]: Input should be a finite number",
        ),
        ("lr", {"uniform": [math.nan, 0.1]}, "lr.uniform[0]: Input should be a finite number"),
        ("lr", {"uniform": [0.1, 0.01]}, "lr.uniform: need low < high; got [0.1, 0.01]"),
        ("lr", {"uniform": [0, 0.1]}, "lr.uniform[0]: Input should be greater than 0"),
        (
            "weight_decay",
            {"loguniform": [0, 1e-3]},
            "weight_decay.loguniform: need 0 < low < high on a log scale; got [0, 0.001]",
        ),
        ("dropout", {"uniform": [0.1, 1.0]}, "dropout.uniform[1]: Input should be less than 1"),
        (
            "batch_size",
            {"randint": [0, 4]},
            "batch_size.randint[0]: Input should be greater than or equal to 1",
        ),
        ("batch_size", {"randint": [4, 4]}, "batch_size.randint: need low < high; got [4, 4]"),
        (
            "lr",
            {"randint": [1, 5]},
            "lr.randint: lr takes real numbers, not what randint samples: use uniform or loguniform",
        ),
        (
            "epochs",
            {"uniform": [2, 8]},
            "epochs.uniform: epochs takes integers, not what uniform samples: use randint [low, high]",
        ),
        (
            "arch",
            {"uniform": [0, 1]},
            "arch.uniform: arch takes one of unet, deeplabv3, "
            "deeplabv3plus, not a range of numbers: list its values with choice or grid_search",
        ),
        ("aspp", {"randint": [0, 1]}, "aspp.randint: aspp takes true or false, not a range"),
        (
            "output_stride",
            {"randint": [8, 32]},
            "output_stride.randint: output_stride takes one of 8, 16, 32, not a range",
        ),
        (
            "epochs",
            {"randint": [1, 4.5]},
            "epochs.randint: expected [low, high], two integers; got [1, 4.5]",
        ),
        ("epochs", {"randint": [True, 4]}, "epochs.randint: expected [low, high], two integers"),
        ("seed", {"randint": [0, 10**30]}, "seed.randint: randint samples 64-bit integers"),
        ("lr", {"uniform": [1e-4, 1e-3, 1e-2]}, "lr.uniform: expected [low, high], two numbers"),
        ("lr", {"uniform": 0.1}, "lr.uniform: expected [low, high], two numbers; got 0.1"),
        ("lr", {"choice": []}, "lr.choice: expected a non-empty list"),
        (
            "batch_size",
            {"grid_search": [8, 0]},
            "batch_size.grid_search[1]: Input should be greater than or equal to 1",
        ),
        ("lr", {"choice": [1e-3, math.inf]}, "lr.choice[1]: Input should be a finite number"),
        (
            "lr",
            {"quniform": [1e-4, 1e-2, 1e-5]},
            "lr: unknown form 'quniform'; expected a value "
            "or one of grid_search, choice, uniform, loguniform, randint",
        ),
        ("lr", {"uniform": [1e-4, 1e-2], "choice": [1e-3]}, "lr: a mapping of 2 keys; expected"),
        (
            "lrr",
            {"loguniform": [1e-4, 1e-2]},
            "lrr: 'lrr' is not a trial key (did you mean lr?); a group key must hold a list",
        ),
        (
            "model",
            {"choice": [{"arch": "unet", "lr": math.inf}]},
            "model.choice[0].lr: Input should be a finite number",
        ),
        (
            "select_metric",
            {"choice": ["val_miou", "miou"]},
            "select_metric.choice[1]: Value error, 'miou' is not a score of each epoch: use one of "
            "train_loss, val_loss, val_miou,",
        ),
    ],
)
def test_each_search_space_value_is_checked_against_its_trial_key(
    key: str, spec: dict[str, object], line: str
) -> None:
    from segtune.config.sweep import validate_sweep

    search = {"search": "grid"} if "grid_search" in spec else RANDOM
    with pytest.raises(ConfigError) as caught:
        validate_sweep({"name": "x", "search_space": {key: spec}, "tune": search})
    assert str(caught.value).startswith(f"invalid sweep: search_space.{line}")
    assert "\n" not in str(caught.value)


def test_a_valid_sampled_space_passes_and_keeps_its_bounds() -> None:
    from segtune.config.sweep import validate_sweep

    space = {
        "lr": {"loguniform": [1e-4, 1e-2]},
        "weight_decay": {"uniform": [0, 1e-3]},  # 0 is a weight decay, not a log-scale bound
        "batch_size": {"randint": [2, 4]},
        "seed": {"randint": [-5, 5]},
        "dropout": {"uniform": [0.0, 0.5]},
        "arch": {"choice": ["unet", "deeplabv3plus"]},
    }
    domains = param_space(validate_sweep({"name": "x", "search_space": space, "tune": RANDOM}))
    assert (domains["lr"].lower, domains["lr"].upper) == (1e-4, 1e-2)
    assert (domains["batch_size"].lower, domains["batch_size"].upper) == (2, 5)
    assert domains["arch"].categories == ["unet", "deeplabv3plus"]


@pytest.mark.parametrize(
    ("sweep", "line"),
    [  # every metric name the sweep uses against what trials report (tracking.names)
        (
            {"tune": {"metric": "val_mIoU"}},
            "tune.metric: 'val_mIoU' is not a metric trials report (did you mean val_miou?); one of "
            "train_loss, val_loss, val_miou,",
        ),
        (
            {
                "tune": {
                    "metric": ["val_miou", "latency"],
                    "mode": ["max", "min"],
                    "search": "optuna",
                },
                "search_space": {},
            },
            "tune.metric: 'latency' is not a metric trials report; one of",
        ),
        (
            {"tune": {"metric": [], "mode": []}},
            "tune.metric: name the metric to optimise, e.g. val_miou",
        ),
        (
            {"tune": {"scheduler": "asha", "metric": "miou"}},  # said once, not twice
            "tune.metric: 'miou' is not a metric trials report",
        ),
        (
            {"train": {"select_metric": "best_val_miou"}},  # reported, but not by each epoch
            "train.select_metric: Value error, 'best_val_miou' is not a score of each epoch",
        ),
    ],
)
def test_metric_names_are_those_trials_report(sweep: dict[str, object], line: str) -> None:
    from segtune.config.sweep import validate_sweep

    with pytest.raises(ConfigError) as caught:
        validate_sweep({"name": "x", **sweep})
    assert str(caught.value).startswith(f"invalid sweep: {line}")
    assert "\n" not in str(caught.value)
    for metric in ("best_val_miou", "infer_ms_cpu", "val_iou_water", "train_img_s"):
        validate_sweep({"name": "x", "tune": {"metric": metric, "mode": "max"}})


@pytest.mark.parametrize(
    ("sweep", "line"),
    [  # counted by arithmetic: a billion seeds take no memory to refuse
        (
            {"tune": {"repeats": 10**9}},
            "sweep size: 1,000,000,000 trials (num_samples 1 x 1 grid point x repeats "
            "1,000,000,000), more than the 10,000 one sweep holds (each is a Ray trial and an "
            "MLflow run): split the study into several sweeps",
        ),
        (
            {"tune": {"search": "random", "num_samples": 10**30}},
            "sweep size: about 10^30 trials (num_samples about 10^30 x 1 grid point x repeats 1)",
        ),
        (
            {
                "search_space": {
                    k: {"grid_search": list(range(1, 21))} for k in ("epochs", "batch_size", "seed")
                },
                "tune": {"num_samples": 2},
            },
            "sweep size: 16,000 trials (num_samples 2 x 8,000 grid points x repeats 1)",
        ),
        (
            {
                "search_space": {
                    k: {"choice": list(range(1, 21))}
                    for k in ("epochs", "batch_size", "seed", "num_workers")
                },
                "tune": RANDOM,
            },
            "search_space: 160,000 combinations of grid_search and choice values (and seeds), more "
            "than the 100,000 the pre-flight checks one by one",
        ),
    ],
)
def test_the_sweep_size_is_bounded(sweep: dict[str, object], line: str) -> None:
    from segtune.config.sweep import validate_sweep

    tracemalloc.start()
    with pytest.raises(ConfigError) as caught:
        validate_sweep({"name": "x", **sweep})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(caught.value).startswith(f"invalid sweep: {line}")
    assert "\n" not in str(caught.value)
    assert peak < 10_000_000  # bytes: nothing enumerated
    # at the bound itself, the sweep is valid
    validate_sweep({"name": "x", "tune": {"search": "random", "num_samples": 10_000}})


def test_a_bad_space_is_refused_before_ray_and_mlflow(tmp_path: Path) -> None:
    """The issue's two commands: one line, exit 2, no Ray session, no store, no run folder."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "name: s\nsearch_space: {lr: {loguniform: [1e-4, .inf]}}\ntune: {search: random}\n"
    )
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}
    base = [sys.executable, "-m", "segtune.run", str(sweep), "--no-report"]
    base += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    base += ["--set", f"tune.storage_path={tmp_path}/runs"]
    done = subprocess.run(base, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"error: {sweep}: invalid sweep: search_space.lr.loguniform[1]: "
        "Input should be a finite number"
    ]
    huge = [*base, "--set", "search_space.lr=0.001", "--set", "tune.repeats=1000000000"]
    done = subprocess.run(
        [*huge, "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "sweep size: 1,000,000,000 trials" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # no ray/, mlflow.db, runs/
