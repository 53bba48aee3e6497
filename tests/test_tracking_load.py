"""The tracking server's load test (`python -m segtune.bench tracking`, `segtune.tracking.server_load`):
a small load against real `mlflow server`s on sqlite and PostgreSQL, every value read back."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from segtune.bench import main
from segtune.cli import run_cli
from segtune.config.names import EPOCH_METRICS
from segtune.errors import ConfigError
from segtune.tracking import server, server_load
from segtune.tracking.runs import start_sweep_run
from tests.servers import (
    drop_first_metrics_batch,
    free_port,
    lossy_proxy,
    postgres_missing,
    postgres_server,
)

LOGGERS, EPOCHS = 8, 5
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def _environment() -> Iterator[None]:
    """The servers started here run no background jobs: the job runner's start-up costs a
    2-core machine seconds of both cores, and nothing here measures time. run_load sizes
    MLflow's connection pool unless told: told here, so that nothing leaks to other tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        patch.setenv("MLFLOW_HTTP_POOL_MAXSIZE", "16")
        yield


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("load-sqlite")
    with server.tracking_server(f"sqlite:///{folder}/mlflow.db", folder, workers=2) as started:
        yield started.url


def assert_all_read_back(uri: str, result: server_load.LoadResult) -> None:
    """Every value sent is in the server, at its step, bit for bit; nothing else is."""
    assert not result.errors
    assert len(result.latencies_s) == LOGGERS * EPOCHS
    assert len(result.expected) == LOGGERS
    client = MlflowClient(uri)
    for run_id, sent in result.expected.items():
        assert sorted(sent) == sorted(EPOCH_METRICS)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        for key, points in sent.items():
            assert [step for step, _ in points] == list(range(EPOCHS))
            history = client.get_metric_history(run_id, key)
            assert sorted((m.step, m.value) for m in history) == points
    check = server_load.verify(client, result.expected)
    assert check.ok, check.examples
    assert check.matched == check.expected == LOGGERS * EPOCHS * len(EPOCH_METRICS)


def test_sqlite_server_keeps_every_value(sqlite_server: str) -> None:
    result = server_load.run_load(sqlite_server, LOGGERS, EPOCHS, experiment="load-sqlite")
    assert_all_read_back(sqlite_server, result)


@pytest.mark.launch  # a whole sweep or a server: make test-cluster (make test's 12 min)
@pytest.mark.skipif(postgres_missing() is not None, reason=str(postgres_missing()))
def test_postgresql_server_keeps_every_value(tmp_path: Path) -> None:
    with (
        postgres_server(tmp_path) as database,
        server.tracking_server(database, tmp_path, workers=2) as started,
    ):
        result = server_load.run_load(started.url, LOGGERS, EPOCHS, experiment="load-postgresql")
        assert_all_read_back(started.url, result)


def test_verify_counts_what_the_server_does_not_have(sqlite_server: str) -> None:
    """Real runs holding less, other and more than `expected` says."""
    client = MlflowClient(sqlite_server)
    parent = start_sweep_run(client, "load-verify", "verify", "", "")
    short, changed = (
        server_load.open_trial(sqlite_server, "load-verify", parent, i, 5) for i in (0, 1)
    )
    expected: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for trial in (short, changed):
        values = {key: [(epoch, 0.5 + epoch) for epoch in range(5)] for key in EPOCH_METRICS}
        expected[trial.run_id] = values
    for epoch in range(3):  # two epochs of `short` never logged
        short.log_epoch(epoch, {key: 0.5 + epoch for key in EPOCH_METRICS})
    short.finish()
    for epoch in range(6):  # one value changed, one epoch too many; the run left RUNNING
        metrics = {key: 0.5 + epoch for key in EPOCH_METRICS}
        if epoch == 2:
            metrics["val_miou"] = 0.25
        changed.log_epoch(epoch, metrics)

    check = server_load.verify(client, expected)
    assert not check.ok
    assert check.expected == 2 * 5 * len(EPOCH_METRICS)
    assert check.missing == 2 * len(EPOCH_METRICS)
    assert check.mismatched == 1
    assert check.matched == check.expected - check.missing - 1
    assert check.extra == len(EPOCH_METRICS)
    assert check.runs_not_finished == 1
    text = "\n".join(line for lines in check.examples.values() for line in lines)
    assert f"run {short.run_id} train_loss step 3: missing (sent 3.5)" in text
    assert f"run {changed.run_id} val_miou step 2: sent 2.5, read 0.25" in text
    assert f"{len(EPOCH_METRICS) * 2 + 1} of {check.expected} values lost" in check.summary()
    assert check.after_error == 0  # every call was acknowledged
    # the same runs, where the calls of the two epochs never logged had raised an error
    failed = {(short.run_id, 3), (short.run_id, 4)}
    assert server_load.verify(client, expected, failed).after_error == 2 * len(EPOCH_METRICS)


COLUMNS = ("backend", "loggers", "epochs", "values logged", "values read back",
           "p50 ms", "p95 ms", "max ms", "total s", "values/s")  # fmt: skip


def table(stdout: str) -> dict[str, str]:
    """The command's one-row table as {column: value} (its values have no spaces)."""
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("# ") and "mlflow " in lines[0], stdout
    assert re.fullmatch(r"\s*" + r"\s+".join(map(re.escape, COLUMNS)), lines[1]), stdout
    return dict(zip(COLUMNS, lines[2].split(), strict=True))


def live_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that still run (zombies waiting for init do not)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_command_reports_a_load_through_a_running_server(
    sqlite_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tracking", "--tracking-uri", sqlite_server, "--loggers", "3", "--epochs", "4"]
    assert run_cli(main, argv) == 0
    out, err = capsys.readouterr()
    row = table(out)
    values = str(3 * 4 * len(EPOCH_METRICS))
    assert row["backend"] == "server" and (row["loggers"], row["epochs"]) == ("3", "4")
    assert row["values logged"] == row["values read back"] == values
    assert float(row["p50 ms"]) <= float(row["p95 ms"]) <= float(row["max ms"])
    assert "View run" not in out  # MLflow's links to the runs stay out of the table


def test_command_exits_1_when_the_server_loses_a_value(
    sqlite_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with lossy_proxy(sqlite_server, drop_first_metrics_batch()) as proxy:
        argv = ["tracking", "--tracking-uri", proxy, "--loggers", "2", "--epochs", "3"]
        assert run_cli(main, argv) == 1
    out, err = capsys.readouterr()
    keys, total = len(EPOCH_METRICS), 2 * 3 * len(EPOCH_METRICS)
    row = table(out)
    assert (row["values logged"], row["values read back"]) == (str(total), str(total - keys))
    assert (
        f"error: {keys} of {total} values lost ({keys} missing, 0 with another value; "
        f"0 in calls that failed with an error, {keys} acknowledged by the server)"
    ) in err
    assert err.count(": missing (sent ") == server_load.MAX_EXAMPLES


@pytest.mark.server  # the command starts it: no name in this code says so
def test_command_starts_and_stops_its_own_server(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="segtune.tracking")
    assert main(["tracking", "--loggers", "2", "--epochs", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    row = table(out)
    assert row["backend"] == "sqlite" and row["values read back"] == str(2 * 2 * len(EPOCH_METRICS))
    assert "workers 1, backend sqlite:///" in out
    assert "2/4 epochs logged" in caplog.text  # progress, every 10 % (here each epoch)
    pid = int(re.search(r"up \(pid (\d+)", caplog.text).group(1))  # type: ignore[union-attr]
    assert live_members(pid) == []  # the server's whole process group is gone


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loggers", "0"], "invalid --loggers 0: must be an integer >= 1"),
        (["--epochs", "-1"], "invalid --epochs -1"),
        (["--backend-store-uri", "redis://127.0.0.1/0"], "unsupported scheme 'redis'"),
        (["--tracking-uri", "sqlite:///x.db"], "must be the http(s) URL of a server"),
        (["--tracking-uri", "http://127.0.0.1:9", "--workers", "2"], "not with --tracking-uri"),
    ],
)
def test_bad_options_give_one_error_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(main, ["tracking", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_unreachable_tracking_uri_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert run_cli(main, ["tracking", "--tracking-uri", url]) == 2
    assert capsys.readouterr().err.startswith(f"error: tracking URI {url}: no answer within")


def test_a_password_stays_out_of_messages() -> None:
    with pytest.raises(ConfigError, match=r"redis://me:\*\*\*@h/0") as raised:
        server.backend_kind("redis://me:secret@h/0")
    assert "secret" not in str(raised.value)
