"""The report's interactive views (Plotly, its JavaScript saved beside the page so that it works
offline): every point names its trial and configuration on hover, and a click opens the
trial's MLflow run page when the tracking store is a server.

The PNGs of `dashboards.figures` stay: MLflow's artifact view shows them where scripts do not run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from dashboards.figures import LOG_RANGE, TITLES, numeric
from segtune.config.names import OBJECTIVE, format_metric
from segtune.tracking.query import PARAM_PREFIX
from segtune.tracking.select import pareto_front

PLOTLY_JS = "plotly.min.js"
MAX_MARKER = 60.0  # marker diameter (px) of the largest model
# a click on a point whose link is a URL opens the run; the link of a file store is the run id
CLICK = (
    "document.getElementById('{plot_id}').on('plotly_click', function (event) {"
    " var link = event.points[0].customdata;"
    " if (typeof link === 'string' && /^https?:/.test(link)) { window.open(link, '_blank'); }"
    " });"
)


def write_plotly_js(out: Path) -> str:
    """Plotly's bundle beside the report (written once); its path relative to the report."""
    path = out / PLOTLY_JS
    if not path.exists():
        path.write_text(get_plotlyjs())
    return PLOTLY_JS


def configuration(row: pd.Series, params: Sequence[str]) -> list[str]:
    """A trial's configuration as `key=value` lines, the given param columns in order."""
    return [f"{p[len(PARAM_PREFIX) :]}={row[p]}" for p in params if pd.notna(row.get(p))]


def hover_text(row: pd.Series, params: Sequence[str], metrics: Sequence[str], link: str) -> str:
    """What a point says on hover: its trial, configuration, metrics and run."""
    lines = [f"<b>{row['label']}</b>", *configuration(row, params)]
    lines += [f"{m} {format_metric(row.get(m), '{:.4g}')}" for m in metrics if m in row]
    lines.append(f"run {row['run_id']}" + (" (click to open)" if link.startswith("http") else ""))
    return "<br>".join(lines)


def _rgba(color: Sequence[float], alpha: float) -> str:
    r, g, b = (int(round(255 * c)) for c in color[:3])
    return f"rgba({r},{g},{b},{alpha})"


def pareto(
    trials: pd.DataFrame,
    cost: str,
    colors: Mapping[str, tuple[float, ...]],
    links: Mapping[str, str],
    params: Sequence[str],
    objective: str = OBJECTIVE,
) -> go.Figure | None:
    """The objective against one cost, marker area proportional to size, the front and the
    colour-only floor: the PNG's view, with hover and links. None when no trial has the cost."""
    if cost not in trials.columns:
        return None
    usable = trials.dropna(subset=[objective, cost])
    if usable.empty:
        return None
    x = usable[cost].to_numpy(dtype=float)
    y = usable[objective].to_numpy(dtype=float)
    sizes = numeric(usable, "size_mb").fillna(0).to_numpy()
    diameters = (
        np.sqrt(sizes / sizes.max()) * MAX_MARKER if sizes.max() > 0 else np.full(len(x), 14.0)
    )
    front = pareto_front(usable, objective, [cost]).to_numpy()
    metrics = [objective, cost, "size_mb"]
    fig = go.Figure()
    order = np.argsort(x[front])
    fig.add_trace(
        go.Scatter(
            x=x[front][order],
            y=y[front][order],
            mode="lines",
            line={"shape": "hv", "dash": "dash", "color": "black", "width": 1},
            name="Pareto front",
            hoverinfo="skip",
        )
    )
    for position, (_, row) in enumerate(usable.iterrows()):
        link = links[row["run_id"]]
        fig.add_trace(
            go.Scatter(
                x=[x[position]],
                y=[y[position]],
                mode="markers",
                name=str(row["label"]),
                marker={
                    "size": max(8.0, float(diameters[position])),
                    "color": _rgba(colors[row["label"]], 0.55),
                    "line": {"color": "black", "width": 2 if front[position] else 0},
                },
                hovertext=[hover_text(row, params, metrics, link)],
                hoverinfo="text",
                customdata=[link],
            )
        )
    positive = x[x > 0]
    wide = len(positive) == len(x) and positive.max() / positive.min() > LOG_RANGE
    floors = pd.to_numeric(usable.get("floor_miou", pd.Series(dtype=float)), errors="coerce")
    if objective == OBJECTIVE:
        for floor in sorted(floors.dropna().unique()):
            fig.add_hline(
                y=float(floor),
                line={"dash": "dot", "color": "#555"},
                annotation_text=f"colour-only floor {floor:.3f}",
                annotation_position="bottom left",
            )
    fig.update_layout(
        title=f"{TITLES.get(objective, objective)} vs {TITLES.get(cost, cost)}",
        xaxis={"title": TITLES.get(cost, cost), "type": "log" if wide else "linear"},
        yaxis={"title": TITLES.get(objective, objective)},
        template="plotly_white",
        height=480,
        legend={"font": {"size": 10}},
        margin={"t": 50, "r": 10},
    )
    return fig


def div(fig: go.Figure, name: str) -> str:
    """The figure as a <div> with its click handler; the page loads Plotly itself."""
    return fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=name,
        post_script=CLICK,
        config={"displaylogo": False, "responsive": True},
    )
