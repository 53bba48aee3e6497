"""What a sweep shows while its trials run (segtune.sweep.progress): Ray's trials named by their
labels, in folders any storage takes, and a table of the columns that matter. No Ray is
started: these are Tune's own Trial objects, made as its controller makes them."""

from __future__ import annotations

import pytest
from ray.tune.experiment import Trial

from segtune.config.sweep import SweepConfig, validate_sweep
from segtune.sweep.progress import Progress, TrialNames
from segtune.sweep.space import GRID_KEY

LABEL = "deeplabv3-resnet18-aspp-basic-aspp_rates=(1, 2, 3)"
CONFIG = {
    GRID_KEY: {"aspp_rates": [1, 2, 3], "model": {"arch": "deeplabv3", "backbone": "resnet18"}}
}


@pytest.fixture
def sweep() -> SweepConfig:
    models = [{"arch": "unet", "backbone": "none"}, {"arch": "deeplabv3", "backbone": "resnet18"}]
    return validate_sweep(
        {
            "name": "progress",
            "train": {"epochs": 4},
            "search_space": {
                "aspp_rates": {"grid_search": [[1, 2, 3], [6, 12, 18]]},
                "model": {"grid_search": models},
            },
        }
    )


def trial(sweep: SweepConfig) -> Trial:
    names = TrialNames(sweep)
    return Trial("run_trial", config=CONFIG, stub=True, trial_name_creator=names.name,
                 trial_dirname_creator=names.folder)  # fmt: skip


def test_a_trial_is_named_by_its_label_and_its_folder_is_safe_and_its_own(
    sweep: SweepConfig,
) -> None:
    first, second = trial(sweep), trial(sweep)  # one configuration drawn twice
    assert str(first) == str(second) == LABEL
    assert (
        first.custom_dirname == f"deeplabv3-resnet18-aspp-basic-aspp_rates=_1_2_3_{first.trial_id}"
    )
    assert (
        second.custom_dirname == f"{first.custom_dirname[: -len(first.trial_id)]}{second.trial_id}"
    )
    assert first.trial_id != second.trial_id


def test_the_table_shows_label_status_epoch_and_scores_once_they_change(
    sweep: SweepConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    running = trial(sweep)
    running.set_status(Trial.RUNNING)
    running.run_metadata.last_result = {
        "training_iteration": 2,
        "val_miou": 0.41,
        "best_val_miou": 0.4567,
    }
    progress = Progress(sweep, every_s=0)
    progress.on_step_end(1, [trial(sweep), running])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith(" trials: 1 RUNNING, 1 PENDING")
    assert lines[2].split() == ["trial", "status", "epoch", "val_miou", "best_val_miou"]
    assert lines[3].startswith(f"{LABEL}  RUNNING")  # running trials first
    assert lines[3].split()[-3:] == ["2/4", "0.410", "0.457"]
    assert lines[4].split()[-4:] == ["PENDING", "0/4", "—", "—"]
    progress.on_step_end(2, [running])
    progress.on_step_end(3, [running])  # nothing changed: no table
    assert capsys.readouterr().out.count(" trials: ") == 1
    running.set_status(Trial.TERMINATED)  # its final result: held at the trial's epochs
    running.run_metadata.last_result = {
        "training_iteration": 5,
        "val_miou": 0.5,
        "best_val_miou": 0.5,
    }
    progress.on_step_end(4, [running])
    assert capsys.readouterr().out.splitlines()[-1].split()[-4:] == [
        "TERMINATED",
        "4/4",
        "0.500",
        "0.500",
    ]
    quiet = Progress(sweep, every_s=60)
    quiet.on_step_end(5, [running])
    running.set_status(Trial.ERROR)
    quiet.on_step_end(6, [running])  # changed, but within a minute of its last table
    assert capsys.readouterr().out.count(" trials: ") == 1
