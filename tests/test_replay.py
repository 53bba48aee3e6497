"""The replay bench: hypervolume, the slots' schedule, and the committed recorded grid replayed
from a real MLflow store (`python -m segtune.bench replay`), with the issue's acceptance figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from segtune.bench import main as bench_main
from segtune.sweep.recording import Recording, Trial, load_json, read_recording, write_to_mlflow
from segtune.sweep.replay import Replay, _schedule, hypervolume, replay_table
from segtune.tracking.select import parse_budget

FIXTURE = Path(__file__).parent / "fixtures" / "replay_grid.json"


def test_hypervolume_of_a_front() -> None:
    # mIoU 0.4..0.8 and cost 2..8 become 0..1; the reference is (mIoU -0.1, cost 1.1)
    box = (0.4, 0.8, 2.0, 8.0)
    points = [(0.5, 2.0), (0.8, 8.0), (0.4, 5.0)]  # the last is dominated
    assert hypervolume(points, box) == pytest.approx(0.35 * 1.1 + 0.75 * 0.1)
    assert hypervolume([(0.3, 2.0)], box) == 0.0  # below the reference
    assert hypervolume([], box) == 0.0


def test_slots_take_trials_in_order_until_the_budget() -> None:
    lengths = [3, 3, 3]
    assert _schedule([0, 1, 2], lengths, None, 100, workers=1) == {0: 3, 1: 3, 2: 3}
    assert _schedule([0, 1, 2], lengths, None, 4, workers=2) == {0: 2, 1: 2}
    stop_first = _schedule([0, 1, 2], lengths, lambda k, n: k != 0, 100, workers=1)
    assert stop_first == {0: 1, 1: 3, 2: 3}


def test_grid_at_full_budget_finds_the_whole_front() -> None:
    trials = [
        Trial("small", {}, (0.1, 0.2, 0.3), {"size_mb": 1.0}),
        Trial("large", {}, (0.2, 0.4, 0.6), {"size_mb": 9.0}),
        Trial("bad", {}, (0.0, 0.0, 0.1), {"size_mb": 9.0}),
    ]
    replay = Replay(trials, "size_mb")
    for seed in range(3):
        outcome = replay.run("grid", replay.grid_epochs, seed)
        assert (outcome.epochs, outcome.best_miou, outcome.hv_share) == (9, 0.6, 1.0)
    # with a constraint the large models are never trained; the share is of the feasible grid's
    kept = parse_budget("size_mb<=5")
    outcome = replay.run("grid", replay.grid_epochs, 0, kept)
    assert (outcome.epochs, outcome.best_miou, outcome.hv_share) == (3, 0.3, 1.0)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Recording]:
    """The committed fixture written into a fresh sqlite store, then read back as the bench
    reads any finished sweep."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('replay') / 'mlflow.db'}"
    fixture = load_json(FIXTURE)
    write_to_mlflow(fixture, uri)
    back = read_recording(fixture.experiment, uri)
    assert [(t.label, t.curve, t.costs) for t in back.trials] == [
        (t.label, t.curve, t.costs) for t in fixture.trials
    ]
    return uri, back


def test_the_recorded_grid_is_the_issues_size(recorded: tuple[str, Recording]) -> None:
    _, recording = recorded
    assert len(recording.trials) >= 24 and min(len(t.curve) for t in recording.trials) >= 8
    searched = {k for t in recording.trials for k, v in t.params.items()
                if len({u.params.get(k) for u in recording.trials}) > 1}  # fmt: skip
    assert {"arch", "backbone", "aspp", "augment", "lr"} <= searched
    assert FIXTURE.stat().st_size < 200_000


def test_moasha_finds_the_front_with_half_the_epochs(recorded: tuple[str, Recording]) -> None:
    """The issue's acceptance: MO-ASHA reaches >= 90% of the grid's hypervolume with <= 50% of
    its trial-epochs (median of 10 seeds), on the sweep file's own grace period and factor."""
    _, recording = recorded
    replay = Replay(recording.trials, "infer_ms_cpu")
    rows = {(r.strategy, r.budget): r for r in replay_table(replay, seeds=10)}
    moasha = rows["moasha", 0.5]
    assert moasha.epochs <= 0.5 * replay.grid_epochs and moasha.hv_share >= 0.9, moasha
    assert rows["grid", 1.0].hv_share == 1.0


def test_the_command_replays_an_experiment(
    recorded: tuple[str, Recording], capsys: pytest.CaptureFixture[str]
) -> None:
    uri, recording = recorded
    argv = ["replay", "--experiment", recording.experiment, "--tracking-uri", uri,
            "--constraints", "size_mb<=5", "--seeds", "2"]  # fmt: skip
    assert bench_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"# {recording.experiment}: {len(recording.trials)} trials x ")
    # 4 strategies x 3 budgets, without and with the constraint, under one header line
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 24 and {r[1] for r in rows} == {"none", "size_mb<=5"}
    assert {r[0] for r in rows} == {"grid", "random", "asha", "moasha"}
