"""What mattered in a sweep: how much each searched key decides whether a trial is among the
best (Optuna's default evaluator, PED-ANOVA, over the finished trials), and every trial as one
line across the keys (parallel coordinates), coloured by the objective.

PED-ANOVA rather than fANOVA: on 12 trials where only the learning rate mattered, fANOVA's
random forest still gave the idle key 0.36 of the variance, PED-ANOVA 0.06.

The trials come from MLflow, so they are turned back into an Optuna study: numeric keys
become float (or int) distributions over the values seen, log-scaled when they span a decade,
and everything else a categorical one.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import optuna
import optuna.visualization.matplotlib as mpl_plots
import pandas as pd
import plotly.graph_objects as go
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.importance import PedAnovaImportanceEvaluator

from dashboards.figures import save
from segtune.tracking.query import PARAM_PREFIX

MIN_TRIALS = 5  # fewer finished trials than this and importance is noise
IMPORTANCE_PNG = "importance.png"
PARALLEL_PNG = "parallel_coordinates.png"


def _distribution(values: pd.Series) -> tuple[BaseDistribution, pd.Series]:
    """The distribution a key was searched in, guessed from its values, and the values in it."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        low, high = float(numbers.min()), float(numbers.max())
        log = low > 0 and high / low >= 10
        if (numbers == numbers.round()).all():
            return IntDistribution(int(low), int(high), log=log and low >= 1), numbers.astype(int)
        return FloatDistribution(low, high, log=log), numbers.astype(float)
    text = values.astype(str)
    return CategoricalDistribution(sorted(text.unique())), text


def searched_study(trials: pd.DataFrame, params: list[str], objective: str) -> optuna.Study | None:
    """The finished trials with an objective as an Optuna study over the keys in `params`
    (MLflow param columns); None when too few trials or keys to say what mattered."""
    table = trials.assign(_value=pd.to_numeric(trials.get(objective), errors="coerce"))
    table = table.dropna(subset=["_value", *params])
    keys = [p for p in params if table[p].astype(str).nunique() > 1]
    if len(table) < MIN_TRIALS or not keys:
        return None
    columns = {p[len(PARAM_PREFIX) :]: _distribution(table[p]) for p in keys}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name=objective)
    for position in range(len(table)):
        value = float(table["_value"].iloc[position])
        if not math.isfinite(value):
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params={k: v.iloc[position] for k, (_, v) in columns.items()},
                distributions={k: d for k, (d, _) in columns.items()},
                value=value,
                user_attrs={"label": str(table["label"].iloc[position])},
            )
        )
    return study


def _evaluator(study: optuna.Study) -> PedAnovaImportanceEvaluator:
    """PED-ANOVA compares the best trials with all of them: at least 3 of them are the best
    (its default, the top 10%, would be a single trial in a sweep of fewer than 20)."""
    return PedAnovaImportanceEvaluator(target_quantile=max(0.1, min(1.0, 3 / len(study.trials))))


def importances(study: optuna.Study) -> dict[str, float]:
    """Each key's importance, largest first (they sum to 1)."""
    found = optuna.importance.get_param_importances(study, evaluator=_evaluator(study))
    return {key: float(value) for key, value in found.items()}


def importance_figures(
    study: optuna.Study, order: list[str], out: Path
) -> tuple[list[str], list[go.Figure]]:
    """Importance bars and parallel coordinates (keys in `order`, the most important first),
    as PNGs written into `out` (their names returned) and as Plotly figures of the same views."""
    evaluator = _evaluator(study)
    target = study.study_name
    # Optuna marks its plots experimental (nothing for a reader) and sets pyplot's style
    # globally: both undone when the block ends, so the report's other figures keep theirs
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        bars = mpl_plots.plot_param_importances(study, evaluator=evaluator, target_name=target)
        lines = mpl_plots.plot_parallel_coordinate(study, params=order, target_name=target)
        plots = [
            optuna.visualization.plot_param_importances(
                study, evaluator=evaluator, target_name=target
            ),
            optuna.visualization.plot_parallel_coordinate(study, params=order, target_name=target),
        ]
        names = []
        for name, ax in ((IMPORTANCE_PNG, bars), (PARALLEL_PNG, lines)):
            figure = ax.get_figure()
            figure.set_size_inches(9, 4.5 if name == IMPORTANCE_PNG else 5.5)
            save(figure, out / name)
            plt.close(figure)  # drawn with pyplot: free its global figure
            names.append(name)
    return names, plots
