"""Run storage: local folders resolved, URIs never taken for paths, unreachable storage one line."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from segtune.errors import ConfigError
from segtune.sweep.storage import RunStorage, is_uri


@pytest.mark.parametrize(
    ("text", "uri"),
    [("s3://bucket/runs", True), ("gs://b", True), ("runs", False), ("/abs/runs", False),
     ("C:/runs", False), ("./s3:/bucket", False)],
)  # fmt: skip
def test_is_uri(text: str, uri: bool) -> None:
    assert is_uri(text) is uri


def test_a_local_folder_is_made_absolute_and_holds_small_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    storage = RunStorage.of("runs")
    assert storage.is_local and storage.location == str(tmp_path / "runs")
    assert isinstance(storage.filesystem[0], pafs.LocalFileSystem)
    assert storage.read_text("sweep", "state.json") is None
    storage.write_text('{"parent_run_id": "x"}', "sweep", "state.json")
    assert (tmp_path / "runs" / "sweep" / "state.json").read_text() == '{"parent_run_id": "x"}'
    storage.write_text("second", "sweep", "state.json")  # replaced whole, no partial file left
    assert [p.name for p in (tmp_path / "runs" / "sweep").iterdir()] == ["state.json"]
    assert storage.read_text("sweep", "state.json") == "second"
    storage.delete("sweep", "state.json")
    assert storage.read_text("sweep", "state.json") is None


def test_an_s3_uri_stays_a_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    storage = RunStorage.of("s3://bucket/segtune/runs/", "http://127.0.0.1:9")
    fs, root = storage.filesystem
    assert storage.location == "s3://bucket/segtune/runs" and root == "bucket/segtune/runs"
    assert isinstance(fs, pafs.S3FileSystem) and not storage.is_local
    assert (
        storage.path("sweep", "segtune_sweep.json")
        == "bucket/segtune/runs/sweep/segtune_sweep.json"
    )
    # a server of one's own: the cloud's metadata service is never asked for credentials
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
    # nodes and trials get the driver's filesystem, endpoint included
    shipped = pickle.loads(pickle.dumps(storage))
    assert "filesystem" in vars(shipped) and shipped.filesystem[0].equals(fs)


def test_storage_mistakes_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="tune.storage_endpoint .* is a local folder"):
        RunStorage.of("runs", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    unreachable = RunStorage.of("s3://bucket/runs", "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(ConfigError, match=r"tune.storage_path s3://bucket/runs: cannot write"):
        unreachable.write_text("x", "a.txt")
