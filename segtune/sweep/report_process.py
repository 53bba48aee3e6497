"""The dashboard report's own process, started beside a sweep's driver (`segtune.run`)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import TracebackType

log = logging.getLogger("segtune.run")


class EarlyReport:
    """`python -m dashboards.report --run-id -`, started with the driver so that both import
    at once, in a session of its own (a Ctrl-C is the driver's to handle) and at the lowest CPU
    priority (nice 19: it takes next to nothing from the pre-flight, Ray's start or a trial,
    and on a busy machine may finish its imports only in the trials' tail); it draws when
    `draw` hands it the sweep run's id, and is killed if the sweep never gets that far."""

    def __init__(self, experiment: str, tracking_uri: str | None) -> None:
        command = [sys.executable, "-m", "dashboards.report", "--experiment", experiment]
        command += ["--run-id", "-"] + (["--tracking-uri", tracking_uri] if tracking_uri else [])
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        with contextlib.suppress(OSError):  # it ended already: `index` says so
            os.setpriority(os.PRIO_PROCESS, self.process.pid, 19)

    def __enter__(self) -> EarlyReport:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process.poll() is None:  # the sweep ended before its report
            self.process.kill()
        self.process.wait()

    def wait_imported(self) -> None:
        """Until the report asks for the run id: its imports are done (or it has ended)."""
        assert self.process.stdout is not None
        self.process.stdout.readline()

    def draw(self, parent: str) -> None:
        """Hand the report the sweep run's id: it draws while the driver goes on (Ray's stop)."""
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it ended early: `index` says so
            self.process.stdin.write(parent + "\n")
            self.process.stdin.close()

    def index(self) -> Path | None:
        """The drawn report's index file, once it is written: a report problem is a warning,
        never a failed sweep."""
        assert self.process.stdout is not None
        out = self.process.stdout.read()
        index = out.strip().splitlines()[-1:] if self.process.wait() == 0 else []
        if index:
            return Path(index[0]).resolve()
        log.warning("report not built (python -m dashboards.report exited %d)",
                    self.process.returncode)  # fmt: skip
        return None
