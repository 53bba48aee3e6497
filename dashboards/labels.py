"""Labels beside the points of a scatter plot, placed so that they cover no other label and no
point: the Pareto plots name every trial."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox


def _spots(radius: float) -> list[tuple[float, float, str]]:
    """Label offsets (points) around a marker, nearest first: right, left, above, below."""
    spots = []
    for step in range(5):
        d = radius + 3 + 14 * step
        spots += [(d, 2, "left"), (d, -12, "left"), (-d, 2, "right"), (-d, -12, "right")]
        spots += [(0, d, "center"), (0, -d - 10, "center")]
    return spots


def _text_box(ann: Annotation, renderer: RendererAgg) -> Bbox:
    """The label's own box: an Annotation's extent also spans its leader line to the point."""
    return Text.get_window_extent(ann, renderer)


def place_labels(
    fig: Figure, ax: Axes, annotations: list[Annotation], radii: Sequence[float]
) -> None:
    """Greedy staggering: each label takes the nearest spot that covers no label and no point.

    Runs after the layout is final (labels are kept out of it), so the display positions
    measured here are the ones saved.
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = ax.transData.transform([ann.xy for ann in annotations])
    placed = [Bbox.from_extents(px - 4, py - 4, px + 4, py + 4) for px, py in points]

    def cost(box: Bbox, rank: int) -> float:
        overlap = sum(
            max(0.0, min(box.x1, b.x1) - max(box.x0, b.x0))
            * max(0.0, min(box.y1, b.y1) - max(box.y0, b.y0))
            for b in placed
        )
        outside = box.x0 < frame.x0 or box.x1 > frame.x1 or box.y0 < frame.y0 or box.y1 > frame.y1
        return overlap + (1e6 if outside else 0.0) + rank * 1e-3

    for i in sorted(range(len(annotations)), key=lambda k: -points[k][1]):
        ann = annotations[i]
        scored = []
        for rank, (dx, dy, ha) in enumerate(_spots(radii[i])):
            ann.xyann = (dx, dy)
            ann.set_horizontalalignment(ha)
            scored.append((cost(_text_box(ann, renderer), rank), dx, dy, ha))
            if scored[-1][0] < 1:
                break
        _, dx, dy, ha = min(scored)
        ann.xyann = (dx, dy)
        ann.set_horizontalalignment(ha)
        placed.append(_text_box(ann, renderer))
