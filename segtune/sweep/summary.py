"""The end of a sweep on the terminal: its trials best first with their Pareto membership and
notes, and where its wall time went (segtune.tracking.timing), kept on its run."""

from __future__ import annotations

import math

import pandas as pd

from segtune.cli import process_age
from segtune.config.names import (
    COLUMNS,
    DATA_WAIT_MEAN,
    INPUT_BOUND_FIX,
    INPUT_BOUND_FRAC,
    OBJECTIVE,
    PARETO_COSTS,
    input_bound,
)
from segtune.config.sweep import SweepConfig

# the summary's columns, and the costs of its Pareto column
SUMMARY_COLUMNS = (
    OBJECTIVE,
    "train_time_min",
    "infer_ms_cpu",
    "infer_ms_gpu",
    "params_m",
    "size_mb",
)
SUMMARY_COSTS = (*PARETO_COSTS, "size_mb")


def print_summary(sweep: SweepConfig, tracking_uri: str, parent: str) -> pd.DataFrame:
    """The trials of the sweep run `parent`, best first, with their Pareto membership; returns
    the trial table it read."""
    from mlflow.tracking import MlflowClient

    from segtune.sweep.budget import budget_line
    from segtune.sweep.warm import reused_lines
    from segtune.tracking.excluded import excluded_lines
    from segtune.tracking.query import load_sweep_table
    from segtune.tracking.runs import runs_page
    from segtune.tracking.select import pareto_front

    table = load_sweep_table(sweep.experiment, tracking_uri, sweep_run_id=parent)
    if table.empty:
        print("no trial ran")
        return table
    ok = table[(table["status"] == "FINISHED") & (table["infeasible"] == "")].copy()
    for key in SUMMARY_COLUMNS:
        if key not in ok:
            ok[key] = math.nan
    costs = [c for c in SUMMARY_COSTS if c in ok and ok[c].notna().any()]
    ok["pareto"] = pareto_front(ok, OBJECTIVE, costs) if len(ok) else []
    ok = ok.sort_values(OBJECTIVE, ascending=False)
    floor = table["floor_miou"].dropna().max() if "floor_miou" in table else math.nan
    below = ok[OBJECTIVE] <= floor  # False where the floor is unknown (NaN)
    waited = ok.get(DATA_WAIT_MEAN, pd.Series(math.nan, ok.index))
    starved = waited.map(input_bound).astype(bool)
    ok["note"] = [
        ", ".join(
            filter(
                None,
                [
                    f"stopped {stop}" if stop else "",
                    "noisy cost" if noisy else "",
                    "not above the colour floor" if low else "",
                    "input-bound" if slow else "",
                ],
            )  # fmt: skip
        )
        for stop, noisy, low, slow in zip(
            ok["early_stopped"], ok["cost_noisy"], below, starved, strict=True
        )
    ]
    titles = {key: COLUMNS[key][0] for key in SUMMARY_COLUMNS}
    where = ["node"] if table["node"].nunique() > 1 else []  # a sweep over several machines
    shown = ok[["label", *where, *SUMMARY_COLUMNS, "pareto", "note"]].rename(columns=titles)
    print(f"\nsweep {sweep.name}: {len(table)} trials")
    if not math.isnan(floor):
        print(
            f"colour-only floor of the validation split (nearest mean training colour): mIoU "
            f"{floor:.3f}; {int(below.sum())} of {len(ok)} finished trials do not beat it"
        )
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    if sweep.tune.repeats > 1 and len(ok):
        spread = ok.groupby("config_label")[OBJECTIVE].agg(["mean", "std", "count"])
        print("\nmIoU over seeds (mean ± std):")
        for name, row in spread.sort_values("mean", ascending=False).iterrows():
            print(f"  {name}: {row['mean']:.4f} ± {row['std']:.4f} (n={int(row['count'])})")
    for _, row in ok[ok["cost_noisy"] != ""].iterrows():
        print(f"noisy cost {row['label']}: {row['cost_noisy']} (timed with the other work)")
    for _, row in ok[starved].iterrows():
        print(
            f"input-bound {row['label']}: waited {row[DATA_WAIT_MEAN]:.0%} of its epochs for "
            f"data (mean over epochs; over {INPUT_BOUND_FRAC:.0%} flags it): {INPUT_BOUND_FIX}"
        )
    for line in excluded_lines(tracking_uri, table, [parent]):  # by tune.constraints
        print(line)
    failed = table[table["status"] == "FAILED"]
    for _, row in failed.iterrows():
        print(f"FAILED {row['label']}: {row['error']}")
    client = MlflowClient(tracking_uri)
    # the compute budget against its spend, and the earlier runs a warm start reused
    notes = [budget_line(sweep, client, parent), *reused_lines(tracking_uri, parent)]
    for note in filter(None, notes):
        print(note)
    experiment = client.get_experiment_by_name(sweep.experiment)
    if experiment is not None:
        page = runs_page(tracking_uri, experiment.experiment_id, parent)
        print(f"\nthe sweep's trials in the MLflow UI: {page}")
    return table


def print_time_account(
    trials: pd.DataFrame, tracking_uri: str, parent: str, slots: int, phases: dict[str, float]
) -> None:
    """Where the sweep's wall time went (segtune.tracking.timing), from the summary's trial
    table, printed and kept on its run."""
    from mlflow.tracking import MlflowClient

    from segtune.tracking.timing import account, account_lines, log_account

    wall = process_age()
    figures = account(trials, phases, slots, wall)
    log_account(MlflowClient(tracking_uri), parent, figures)
    print("\n".join(account_lines(figures)))
