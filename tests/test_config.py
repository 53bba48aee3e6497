"""The sweep file schema: overrides, YAML's surprises, the search-space grammar."""

from __future__ import annotations

from pathlib import Path

import pytest

from segtune.config import apply_overrides, format_hw, parse_hw, trial_config
from segtune.errors import ConfigError
from segtune.space import GRID_KEY, discrete_trials, param_space, resolve_trial
from segtune.sweepfile import load_sweep


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
    from segtune.sweepfile import validate_sweep

    with pytest.raises(ConfigError) as caught:
        validate_sweep({"name": "x", "tune": tune})
    assert str(caught.value).startswith(f"invalid sweep: {line}")
    assert "\n" not in str(caught.value)
