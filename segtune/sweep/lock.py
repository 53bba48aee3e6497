"""One driver per sweep name and run storage at a time.

Two drivers of one name would share Ray's experiment folder: the state would list one sweep's
trials while the sweep state file named the other's run, and only one could ever be resumed.
The lock is a small file beside Ray's experiment state (`<storage>/<name>/segtune.lock`), so a
driver on any machine sees it; the driver refreshes it while it runs and removes it at its end.
A lock whose driver is gone is stale and taken over with a warning: on the same host, its
process no longer exists; elsewhere, its heartbeat is older than STALE_S.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from types import TracebackType

import psutil

from segtune.errors import ConfigError
from segtune.sweep.storage import RunStorage

log = logging.getLogger(__name__)

LOCK_FILE = "segtune.lock"
HEARTBEAT_S = 15.0
STALE_S = 90.0  # six heartbeats missed: the driver is gone (or cut off from the storage)


@dataclass
class Holder:
    """Who holds a sweep's lock."""

    host: str
    pid: int
    process_start: float  # psutil's create_time: a reused pid is not the same driver
    started: float
    heartbeat: float
    parent_run_id: str = ""

    def alive(self) -> bool:
        if self.host == socket.gethostname():
            try:
                return abs(psutil.Process(self.pid).create_time() - self.process_start) < 1.0
            except psutil.Error:
                return False
        return time.time() - self.heartbeat < STALE_S

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        run = f", sweep run {self.parent_run_id}" if self.parent_run_id else ""
        return f"driver pid {self.pid} on {self.host} since {since}{run}"


class SweepLock:
    """`with SweepLock(storage, name) as lock:` holds the lock; `lock.parent(run_id)` records the
    sweep run, so that a refused second driver can name it."""

    def __init__(self, storage: RunStorage, name: str) -> None:
        self.storage, self.name = storage, name
        now = time.time()
        me = psutil.Process()
        self.holder = Holder(socket.gethostname(), os.getpid(), me.create_time(), now, now)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._writing = threading.Lock()  # the heartbeat, `parent` and the release, one at a time
        self._released = False

    def _read(self) -> Holder | None:
        for attempt in range(2):  # a lock caught mid-write reads empty: look again
            text = self.storage.read_text(self.name, LOCK_FILE)
            if text is None:
                return None
            try:
                return Holder(**json.loads(text))
            except (ValueError, TypeError):
                if attempt == 0:
                    time.sleep(1.0)
        log.warning("unreadable lock %s: taken over", self.storage.path(self.name, LOCK_FILE))
        return None

    def _write(self) -> None:
        with self._writing:
            if self._released:
                return
            self.holder.heartbeat = time.time()
            self.storage.write_text(json.dumps(asdict(self.holder)), self.name, LOCK_FILE)

    def __enter__(self) -> SweepLock:
        found = self._read()
        if found is not None and found.alive():
            raise ConfigError(
                f"sweep {self.name!r} is already running with run storage {self.storage} "
                f"({found.describe()}); wait for it to end, or run this one under another "
                "name (--set name=...)"
            )
        if found is not None:
            log.warning(
                "taking over the lock of a sweep whose driver is gone: %s", found.describe()
            )
        self._write()
        # two drivers that start within a moment of each other: the later write wins, and the
        # other driver sees it here (a storage without an atomic create allows no more)
        if self._read() != self.holder:
            raise ConfigError(f"sweep {self.name!r} was started by another driver just now")
        self._beat = threading.Thread(target=self._heartbeat, name="sweep-lock", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except ConfigError as exc:  # the storage is away for a while: the sweep goes on
                log.warning("could not refresh the sweep's lock: %s", exc)

    def parent(self, run_id: str) -> None:
        self.holder.parent_run_id = run_id
        self._write()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        with self._writing:  # no heartbeat writes it again after this
            self._released = True
            try:
                if self._read() == self.holder:
                    self.storage.delete(self.name, LOCK_FILE)
            except ConfigError as exc:  # left behind, it is stale at the next start
                log.warning("could not remove the sweep's lock: %s", exc)
        if self._beat is not None:
            self._beat.join(timeout=5)
