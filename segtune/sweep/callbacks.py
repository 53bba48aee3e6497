"""The driver's Ray Tune callback: it closes the MLflow run of a trial that Ray ended without
the trial closing it itself (stopped early by a scheduler, or its process gone)."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial

from segtune.config.names import COST_KEYS, EARLY_STOP_TAG, ERROR_TAG, QUALITY_METRICS
from segtune.tracking.address import server_health
from segtune.tracking.runs import TrialRun, find_trial_run

log = logging.getLogger(__name__)

# this module's name before segtune's folder per layer: Ray's saved state of a sweep started then
# names it, since Tuner.restore unpickles the run config and its callbacks
FORMER_NAME = "segtune.sweep_callbacks"


def answer_to_former_name() -> None:
    """Let `Tuner.restore` find CloseRuns under the module's former name, so that a sweep
    interrupted before the move resumes after it."""
    sys.modules.setdefault(FORMER_NAME, sys.modules[__name__])


ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Diverged)\b:?")


class CloseRuns(tune.Callback):
    """Closes the MLflow run of a trial that Ray ended without the trial closing it itself:
    stopped early by ASHA (FINISHED, tagged, with the training summary and the costs of its last
    result) or whose process died (FAILED with the error)."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str) -> None:
        self.tracking_uri, self.experiment, self.parent = tracking_uri, experiment, parent_run_id

    def _run(self, trial: Trial) -> Any:
        client = MlflowClient(self.tracking_uri)
        return client, find_trial_run(client, self.experiment, self.parent, trial.trial_id)

    def _reachable(self, trial: Trial) -> bool:
        """Whether the store answers now: on a lost server MLflow's retries would hold Tune's
        loop for minutes (segtune.tracking.outage); the next driver closes the run instead."""
        problem = server_health(self.tracking_uri)
        if problem is not None:
            log.warning("run of trial %s left open: %s", trial.trial_id, problem)
        return problem is None

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        if not self._reachable(trial):
            return
        client, run = self._run(trial)
        if run is None or run.info.status != "RUNNING":
            return
        result = trial.last_result or {}
        summary = {k: result[k] for k in (*QUALITY_METRICS, *COST_KEYS) if k in result}
        epochs = result.get("training_iteration", 0)
        TrialRun(client, run.info.run_id).log_final(
            summary, {EARLY_STOP_TAG: f"after {epochs} epochs"}
        )
        client.set_terminated(run.info.run_id, "FINISHED")

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        if not self._reachable(trial):
            return
        client, run = self._run(trial)
        if run is None:
            return
        if ERROR_TAG not in run.data.tags:
            client.set_tag(run.info.run_id, ERROR_TAG, _error_text(trial))
        if run.info.status != "FAILED":
            client.set_terminated(run.info.run_id, "FAILED")


def _error_text(trial: Trial) -> str:
    """The error's type and message (`ValueError: ...`): the last such line of Ray's error file,
    read now, since the file lives in a temporary folder that does not last."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Failure #")]
    for line in reversed(lines):
        if ERROR_LINE.match(line):
            return line[:2000]
    # a process that died has no exception of its own: Ray's first line says what happened
    return f"the trial's process died: {lines[0]}"[:2000] if lines else "the trial's process died"
