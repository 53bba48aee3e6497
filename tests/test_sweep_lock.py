"""One driver per sweep name: the lock held by a real second process, refused, then found stale
once that process is gone; a lock of another host is live while its heartbeat is."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from segtune.errors import ConfigError
from segtune.sweep.lock import LOCK_FILE, STALE_S, Holder, SweepLock
from segtune.sweep.storage import RunStorage

HOLD = """
import sys, time
from segtune.sweep.storage import RunStorage
from segtune.sweep.lock import SweepLock
with SweepLock(RunStorage.of(sys.argv[1]), "sw") as lock:
    lock.parent("abc123")
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_live_driver_holds_the_name_and_a_dead_one_does_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = RunStorage.of(str(tmp_path / "runs"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, storage.location], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(ConfigError, match="already running") as refused,
            SweepLock(storage, "sw"),
        ):
            pass
        assert f"driver pid {holder.pid}" in str(refused.value)
        assert "sweep run abc123" in str(refused.value)
    finally:
        holder.kill()  # gone without releasing its lock
        holder.wait()
    lock_file = tmp_path / "runs" / "sw" / LOCK_FILE
    assert lock_file.exists()
    with caplog.at_level(logging.WARNING), SweepLock(storage, "sw") as lock:
        assert json.loads(lock_file.read_text())["pid"] == lock.holder.pid
    assert "taking over the lock of a sweep whose driver is gone" in caplog.text
    assert not lock_file.exists()  # released


@pytest.mark.parametrize(("age", "refused"), [(5.0, True), (STALE_S + 5, False)])
def test_another_hosts_lock_lives_while_its_heartbeat_does(
    tmp_path: Path, age: float, refused: bool
) -> None:
    storage = RunStorage.of(str(tmp_path / "runs"))
    now = time.time()
    other = Holder("another-host", 4242, now - 100, now - 100, now - age, "def456")
    storage.write_text(json.dumps(asdict(other)), "sw", LOCK_FILE)
    if refused:
        expected = "pid 4242 on another-host .*sweep run def456"
        with pytest.raises(ConfigError, match=expected), SweepLock(storage, "sw"):
            pass
    else:
        with SweepLock(storage, "sw") as lock:  # taken over: the file now names this process
            held = json.loads((tmp_path / "runs" / "sw" / LOCK_FILE).read_text())
            assert held["pid"] == lock.holder.pid and held["host"] != "another-host"
