"""`--resume` against the sweep's saved copy (segtune.sweep.edits), on a real run storage folder
and a real MLflow store; no Ray starts here (tests/test_sweep.py resumes edited sweeps whole)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from segtune.config.sweep import SweepConfig, validate_sweep
from segtune.errors import ConfigError
from segtune.sweep.edits import (
    SWEEP_COPY_FILE,
    SWEEP_STATE_FILE,
    Addition,
    Edits,
    additions,
    changed_keys,
    check_edits,
    commit,
    read_state,
    sweep_text,
)
from segtune.sweep.storage import RunStorage
from segtune.tracking.runs import start_sweep_run


def make(tmp_path: Path, **sections: Any) -> SweepConfig:
    raw: dict[str, Any] = {
        "name": "edits",
        "data": {"root": str(tmp_path / "data")},
        "train": {"epochs": 1, "lr": 0.003},
        "search_space": {"lr": {"grid_search": [0.003]}},
        "tune": {"storage_path": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_sweep(raw)


def started(tmp_path: Path, **sections: Any) -> RunStorage:
    """The run storage of a sweep that started as `make(**sections)` describes."""
    sweep = make(tmp_path, **sections)
    storage = RunStorage.of(sweep.tune.storage_path)
    storage.write_text(sweep_text(sweep), sweep.name, SWEEP_COPY_FILE)
    storage.write_text(json.dumps({"parent_run_id": "p"}), sweep.name, SWEEP_STATE_FILE)
    return storage


def refused(sweep: SweepConfig, accept: bool) -> str:
    with pytest.raises(ConfigError) as info:
        check_edits(sweep, accept)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_changed_keys_are_dotted_and_a_search_entry_is_one_key() -> None:
    old = {
        "search_space": {"lr": {"grid_search": [1]}},
        "tune": {"resources_per_trial": {"cpu": 1}},
    }
    new = {"search_space": {"lr": {"grid_search": [1, 2]}, "seed": 3}}
    new["tune"] = {"resources_per_trial": {"cpu": 2}}
    assert changed_keys(old, new) == [
        "search_space.lr",
        "tune.resources_per_trial.cpu",
        "search_space.seed",
    ]


def test_an_unchanged_sweep_and_a_sweep_never_started(tmp_path: Path) -> None:
    assert check_edits(make(tmp_path), accept=False) == Edits()  # nothing saved: nothing to do
    started(tmp_path)
    assert check_edits(make(tmp_path), accept=True) == Edits()


def test_an_edit_that_alters_trials_is_refused_naming_its_keys(tmp_path: Path) -> None:
    started(tmp_path)
    edited = make(
        tmp_path, search_space={"lr": {"grid_search": [0.003, 0.01]}}, train={"epochs": 2}
    )
    message = refused(edited, accept=False)
    assert "(train.epochs, search_space.lr)" in message
    assert "another name:" in message and "--resume --accept-changes" in message
    # with --accept-changes the epochs change every trial so far: refused, naming the trial
    message = refused(edited, accept=True)
    assert "drops or changes 1 trial(s)" in message and "lr=0.003" in message


def test_accepted_edits_add_exactly_the_new_grid_points(tmp_path: Path) -> None:
    started(tmp_path, search_space={"lr": {"grid_search": [0.003, 0.002]}})
    wider = make(tmp_path, search_space={"lr": {"grid_search": [0.002, 0.01, 0.003, 0.02]}})
    assert check_edits(wider, accept=True) == Edits(
        save=True, added=Addition(1, trials=[{"lr": 0.01}, {"lr": 0.02}])
    )
    # seeds: two repeats of each configuration, where there was one (seed 0, train's default)
    seeds = make(
        tmp_path, search_space={"lr": {"grid_search": [0.003, 0.002]}}, tune={"repeats": 2}
    )
    added = check_edits(seeds, accept=True).added
    assert added is not None and added.trials == [
        {"lr": 0.003, "seed": 1},
        {"lr": 0.002, "seed": 1},
    ]
    # a train value the search space overrides alters no trial: accepted, nothing added
    shadowed = make(
        tmp_path, search_space={"lr": {"grid_search": [0.003, 0.002]}}, train={"lr": 0.1}
    )
    assert check_edits(shadowed, accept=True) == Edits(save=True)
    dropped = make(tmp_path, search_space={"lr": {"grid_search": [0.003]}})
    assert "lr=0.002" in refused(dropped, accept=True)


def test_a_sampled_sweep_takes_more_samples_only(tmp_path: Path) -> None:
    space = {"lr": {"loguniform": [0.0001, 0.01]}}
    started(tmp_path, search_space=space, tune={"search": "random", "num_samples": 2})
    more = make(tmp_path, search_space=space, tune={"search": "random", "num_samples": 5})
    assert check_edits(more, accept=True) == Edits(save=True, added=Addition(1, samples=3))
    fewer = make(tmp_path, search_space=space, tune={"search": "random", "num_samples": 1})
    assert "tune.num_samples 2 -> 1 drops samples" in refused(fewer, accept=True)
    other = make(
        tmp_path,
        search_space={"lr": {"loguniform": [0.0001, 0.1]}},
        tune={"search": "random", "num_samples": 5},
    )
    message = refused(other, accept=True)
    assert "a random sweep takes more samples only" in message and "search_space.lr" in message


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"data": {"val_split": 0.2}}, "data.val_split"),
        ({"bench": {"input": "64x64"}}, "bench.input"),
        ({"tune": {"search": "random"}}, "tune.search"),
        ({"mlflow": {"experiment": "other"}}, "mlflow.experiment"),
    ],
)
def test_keys_no_edit_may_change_are_refused_even_when_accepted(
    tmp_path: Path, section: dict[str, Any], key: str
) -> None:
    started(tmp_path)
    message = refused(make(tmp_path, **section), accept=True)
    assert message.startswith(f"--resume: {key} cannot change in a started sweep (")


def test_edits_that_alter_no_trial_are_accepted_with_a_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    started(tmp_path)
    tune = {"max_concurrent_trials": 1, "reuse_actors": False}
    edited = make(tmp_path, description="now with notes", tune=tune)
    with caplog.at_level(logging.INFO, "segtune.sweep.edits"):
        assert check_edits(edited, accept=False) == Edits(save=True)
    notes = [r.getMessage() for r in caplog.records]
    assert notes[0] == (
        "--resume: description changed since the sweep started; accepted: the sweep run's note, "
        "now updated"
    )
    for note, key in zip(notes[1:], ["max_concurrent_trials", "reuse_actors"], strict=True):
        assert note.startswith(f"--resume: tune.{key} changed") and "Ray keeps" in note


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("name: [unclosed", "while parsing a flow sequence"),
        ("- a list\n", "not a mapping of a sweep's sections"),
        ("name: edits\nfrobnicate: 1\n", "frobnicate"),
    ],
)
def test_a_damaged_copy_is_one_line(tmp_path: Path, text: str, reason: str) -> None:
    storage = started(tmp_path)
    storage.write_text(text, "edits", SWEEP_COPY_FILE)
    message = refused(make(tmp_path), accept=False)
    assert f"{tmp_path}/runs/edits/{SWEEP_COPY_FILE}, is damaged (" in message
    assert reason in message and "delete it" in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [("{truncated", "Expecting property name"), ('["p"]', "no sweep run id"), ("{}", "")],
)
def test_a_damaged_state_file_is_one_line(tmp_path: Path, text: str, reason: str) -> None:
    """Read by every driver of the sweep (the previous driver's run to close, --resume's run
    and additions): a damaged one is one line, never a traceback; an empty mapping is none."""
    storage = started(tmp_path)
    storage.write_text(text, "edits", SWEEP_STATE_FILE)
    if not reason:
        assert read_state(storage, "edits") == {}
        return
    with pytest.raises(ConfigError) as info:
        read_state(storage, "edits")
    message = str(info.value)
    assert message.startswith(f"sweep edits: its state file, {tmp_path}/runs/edits/")
    assert reason in message and "\n" not in message


def test_a_sweep_an_older_segtune_started_resumes_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = started(tmp_path)
    storage.delete("edits", SWEEP_COPY_FILE)
    with caplog.at_level(logging.WARNING, "segtune.sweep.edits"):
        assert check_edits(make(tmp_path), accept=False) == Edits(save=True)
    assert "edits since then cannot be checked" in caplog.text
    assert "nothing tells which trials are new" in refused(make(tmp_path), accept=True)


def test_commit_names_the_addition_then_saves_the_copy(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = start_sweep_run(client, "edits", "edits", "old: sweep\n", "first note")
    storage = started(tmp_path)
    wider = make(
        tmp_path, description="second", search_space={"lr": {"grid_search": [0.003, 0.01]}}
    )
    edits = check_edits(wider, accept=True)
    commit(edits, wider, storage, client, parent)
    assert additions(storage, "edits") == [Addition(1, trials=[{"lr": 0.01}])]
    assert json.loads(storage.read_text("edits", SWEEP_STATE_FILE))["parent_run_id"] == "p"
    assert storage.read_text("edits", SWEEP_COPY_FILE) == sweep_text(wider)
    assert check_edits(wider, accept=False) == Edits()  # the copy is now the edited file
    logged = client.download_artifacts(parent, "sweep.yaml", str(tmp_path))
    assert yaml.safe_load(Path(logged).read_text()) == wider.model_dump(mode="json")
    assert client.get_run(parent).data.tags["mlflow.note.content"] == "second"
    # the next addition is the second
    widest = make(tmp_path, search_space={"lr": {"grid_search": [0.003, 0.01, 0.1]}})
    assert check_edits(widest, accept=True).added == Addition(2, trials=[{"lr": 0.1}])


def test_ray_state_saved_before_the_layer_folders_unpickles_the_callback() -> None:
    """A sweep started before segtune's folder per layer saved its run config with the callback
    under `segtune.sweep_callbacks` (found once in a real tuner.pkl, issue 24): `--resume`
    answers to that name (the driver calls this just before `Tuner.restore`)."""
    import pickle
    import sys

    from segtune.sweep.callbacks import FORMER_NAME, CloseRuns, answer_to_former_name

    saved = f"c{FORMER_NAME}\nCloseRuns\n.".encode()  # what pickle wrote for the class
    sys.modules.pop(FORMER_NAME, None)
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(saved)
    answer_to_former_name()
    assert pickle.loads(saved) is CloseRuns
