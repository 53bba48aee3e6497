"""Synthetic top-down aerial scenes in the tiny-FloodNet layout, for tests and offline demos.

No dataset can be downloaded on the build machines, so this module draws drone-like scenes
that hold all eight classes with plausible shapes and frequencies: textured grass as the base
layer, bare soil and parking lots (background), a road network with lane marks, vehicles on the
roads and in the lots, buildings with shaded gable roofs and cast shadows, clustered tree
canopies that partly cover roads and roofs, ponds or a river (some with bright sky
reflections, the study's failure case) and small pools next to houses. Colours are natural and
jittered per scene, with noise and texture, so that colour alone does not solve the task.

    python -m segtune.data.synthetic --out data/synthetic --train 200 --test 50 --size 512x384

Every image is drawn from ``np.random.default_rng([seed, index])``: the same seed writes
byte-identical files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from segtune.classes import CLASS_NAMES
from segtune.cli import command_parser, run_cli, setup_logging
from segtune.config.trial import parse_hw
from segtune.data.dataset import SPLITS
from segtune.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

BACKGROUND, BUILDING, ROAD, WATER, TREE, VEHICLE, POOL, GRASS = (
    CLASS_NAMES.index(name)
    for name in ("background", "building", "road", "water", "tree", "vehicle", "pool", "grass")
)

JPEG_QUALITY = 90
MIN_SIZE = 32
# Ground resolution of a 512x384 image: about 120 m across, like the tiny-FloodNet tiles.
_PX_PER_M_AT_512 = 4.2

Color = tuple[float, float, float]

_ROOF_COLORS: tuple[Color, ...] = (
    (150, 82, 62),  # terracotta
    (118, 88, 70),  # brown shingle
    (72, 74, 80),  # dark grey
    (160, 160, 156),  # light grey
    (205, 203, 196),  # white membrane
    (92, 104, 118),  # blue-grey metal
    (128, 60, 52),  # dark red
)
_VEHICLE_COLORS: tuple[Color, ...] = (
    (235, 235, 232),
    (228, 228, 225),
    (30, 30, 34),
    (172, 174, 178),
    (120, 122, 126),
    (175, 30, 32),
    (38, 62, 140),
    (205, 170, 40),
    (40, 90, 60),
)


@dataclass
class _Material:
    """How one surface is painted: two colours mixed by noise fields, plus grain."""

    a: Color
    b: Color
    w_low: float  # weight of the ~15 m blotch field
    w_mid: float  # weight of the ~1 m clump field (grass tufts, leaves)
    w_fine: float  # weight of the 2 px field
    grain: float  # per-pixel luminance noise, in grey levels


@dataclass
class _Road:
    points: np.ndarray  # (K, 2) float polyline in pixels, running far past the image border
    width: float


@dataclass
class _Canvas:
    """Label, material, shading and height maps of one scene, painted in back-to-front order."""

    rng: np.random.Generator
    width: int
    height: int
    px_per_m: float
    mask: np.ndarray = field(init=False)
    mat: np.ndarray = field(init=False)
    shade: np.ndarray = field(init=False)
    occupied: np.ndarray = field(init=False)  # roads, water, lots, buildings, pools: no overlap
    tree_height: np.ndarray = field(init=False)
    glare: np.ndarray = field(init=False)  # 0..1 blend towards the sky colour on water
    sky: Color = (210.0, 215.0, 220.0)
    materials: list[_Material] = field(default_factory=list)

    def __post_init__(self) -> None:
        shape = (self.height, self.width)
        self.mask = np.zeros(shape, np.uint8)
        self.mat = np.zeros(shape, np.uint8)
        self.shade = np.ones(shape, np.float32)
        self.occupied = np.zeros(shape, np.uint8)
        self.tree_height = np.zeros(shape, np.float32)
        self.glare = np.zeros(shape, np.float32)

    def m(self, metres: float) -> float:
        """Metres to pixels."""
        return metres * self.px_per_m

    @property
    def area_ratio(self) -> float:
        """Ground area relative to a 120 m x 90 m tile: object counts scale with it."""
        return self.width * self.height / self.px_per_m**2 / (120 * 90)

    def add_material(self, material: _Material) -> int:
        """Register a material; its index is what ``mat`` holds (a scene uses a few dozen)."""
        self.materials.append(material)
        return len(self.materials) - 1

    def fill_poly(
        self, poly: np.ndarray, cls: int, mat: int, shade: float | None = None, occupy: bool = True
    ) -> None:
        pts = [np.round(poly).astype(np.int32)]
        cv2.fillPoly(self.mask, pts, cls)
        cv2.fillPoly(self.mat, pts, mat)
        if shade is not None:
            cv2.fillPoly(self.shade, pts, shade)
        if occupy:
            cv2.fillPoly(self.occupied, pts, 1)

    def polyline(
        self, points: np.ndarray, thickness: float, cls: int, mat: int, occupy: bool = True
    ) -> None:
        pts = [np.round(points).astype(np.int32)]
        t = max(1, round(thickness))
        cv2.polylines(self.mask, pts, False, cls, t)
        cv2.polylines(self.mat, pts, False, mat, t)
        if occupy:
            cv2.polylines(self.occupied, pts, False, 1, t)

    def fill_region(self, region: np.ndarray, box: tuple[slice, slice], cls: int, mat: int) -> None:
        self.mask[box][region] = cls
        self.mat[box][region] = mat
        self.occupied[box][region] = 1

    def mark(self, layer: np.ndarray, on_mat: int, paint: int) -> None:
        """Paint markings (non-zero ``layer`` pixels) only on the visible ``on_mat`` surface.

        Markings change the material, never the label, and stay off whatever was drawn over
        that surface (a crossing road, a sidewalk, the grass beyond a rounded edge).
        """
        self.mat[(layer > 0) & (self.mat == on_mat)] = paint

    def _raster(self, poly: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray, float] | None:
        """The polygon's on-image bounding box, its pixels there, and its full area."""
        area = float(cv2.contourArea(poly.astype(np.float32)))
        x0, y0 = np.floor(poly.min(axis=0)).astype(int)
        x1, y1 = np.ceil(poly.max(axis=0)).astype(int) + 1
        cx0, cy0 = max(int(x0), 0), max(int(y0), 0)
        cx1, cy1 = min(int(x1), self.width), min(int(y1), self.height)
        if area < 1 or cx1 <= cx0 or cy1 <= cy0:
            return None
        tmp = np.zeros((cy1 - cy0, cx1 - cx0), np.uint8)
        cv2.fillPoly(tmp, [np.round(poly - (cx0, cy0)).astype(np.int32)], 1)
        return (slice(cy0, cy1), slice(cx0, cx1)), tmp.astype(bool), area

    def busy_fraction(self, poly: np.ndarray) -> float:
        """Share of the polygon that is occupied or off the image (1.0 when wholly off it)."""
        raster = self._raster(poly)
        if raster is None:
            return 1.0
        box, inside, area = raster
        n_inside = int(inside.sum())
        busy = int(self.occupied[box][inside].sum())
        return min(1.0, (busy + max(0.0, area - n_inside)) / max(area, n_inside, 1))

    def overlaps(self, poly: np.ndarray, cls: int) -> bool:
        """Whether the polygon touches a pixel of ``cls`` (or lies wholly off the image)."""
        raster = self._raster(poly)
        if raster is None:
            return True
        box, inside, _ = raster
        return bool((self.mask[box][inside] == cls).any())

    def blob(
        self, cx: float, cy: float, rx: float, ry: float, angle: float, roughness: float
    ) -> tuple[np.ndarray, tuple[slice, slice]] | None:
        """An irregular region: an ellipse whose soft edge is thresholded against smooth noise."""
        r = max(rx, ry)
        pad = int(r * 0.6) + 2
        x0, x1 = max(int(cx - r) - pad, 0), min(int(cx + r) + pad + 1, self.width)
        y0, y1 = max(int(cy - r) - pad, 0), min(int(cy + r) + pad + 1, self.height)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        tmp = np.zeros((y1 - y0, x1 - x0), np.float32)
        cv2.ellipse(
            tmp,
            (round(cx - x0), round(cy - y0)),
            (max(1, round(rx)), max(1, round(ry))),
            math.degrees(angle),
            0,
            360,
            1.0,
            -1,
        )
        soft = cv2.GaussianBlur(tmp, (0, 0), max(1.0, 0.25 * min(rx, ry)))
        noise = _smooth_noise(self.rng, tmp.shape, max(2.0, 0.35 * r)) - 0.5
        region = (soft + roughness * noise > 0.5) & (soft > 0.2)
        return region, (slice(y0, y1), slice(x0, x1))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Value noise in about [0, 1] with features of ``cell`` pixels: a random grid, upscaled."""
    h, w = shape
    grid = rng.random((max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _standardized(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-6)


def _jitter(rng: np.random.Generator, color: Color, amount: float) -> Color:
    """A colour with brightness and per-channel jitter, so no class has one fixed colour."""
    gain = rng.uniform(1 - amount, 1 + amount)
    r, g, b = (c * gain + rng.normal(0, 40 * amount) for c in color)
    return (r, g, b)


def _rect(cx: float, cy: float, length: float, width: float, angle: float) -> np.ndarray:
    """Corners of a rectangle whose long side ``length`` points along ``angle``."""
    u = np.array([math.cos(angle), math.sin(angle)]) * length / 2
    v = np.array([-math.sin(angle), math.cos(angle)]) * width / 2
    c = np.array([cx, cy])
    return np.array([c - u - v, c + u - v, c + u + v, c - u + v])


def _point_on(points: np.ndarray, t: float) -> tuple[np.ndarray, float]:
    """The point at arc length ``t`` along a polyline and the direction angle there."""
    seg = np.diff(points, axis=0)
    lengths = np.hypot(seg[:, 0], seg[:, 1])
    i = min(int(np.searchsorted(np.cumsum(lengths), t)), len(seg) - 1)
    start = t - float(lengths[:i].sum())
    d = seg[i] / lengths[i]
    return points[i] + d * start, math.atan2(d[1], d[0])


def _offset_polyline(points: np.ndarray, offset: float) -> np.ndarray:
    """The polyline shifted sideways by ``offset`` pixels (vertex normals averaged)."""
    seg = np.diff(points, axis=0)
    seg /= np.hypot(seg[:, 0], seg[:, 1])[:, None]
    normals = np.stack([-seg[:, 1], seg[:, 0]], axis=1)
    vertex_normals = np.vstack([normals[:1], normals[:-1] + normals[1:], normals[-1:]])
    vertex_normals /= np.hypot(vertex_normals[:, 0], vertex_normals[:, 1])[:, None]
    return points + vertex_normals * offset


def _visible_arc(road: _Road, width: int, height: int) -> tuple[float, float]:
    """Arc-length interval of the road's centreline that lies on the image."""
    pts = road.points
    seg = np.diff(pts, axis=0)
    cum = np.concatenate([[0.0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))])
    # Roads run about two diagonals long: 400 samples lie a few pixels apart.
    ts = np.linspace(0, cum[-1], 400)
    xs = np.interp(ts, cum, pts[:, 0])
    ys = np.interp(ts, cum, pts[:, 1])
    on = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    if not on.any():
        return 0.0, 0.0
    return float(ts[on][0]), float(ts[on][-1])


def _ground(c: _Canvas) -> None:
    """Grass everywhere, then bare-soil patches."""
    rng = c.rng
    lush = _jitter(rng, (78, 118, 52), 0.12)
    dry = _jitter(rng, (138, 136, 84), 0.12)
    grass = c.add_material(_Material(lush, dry, w_low=0.32, w_mid=0.22, w_fine=0.12, grain=6))
    c.mask[:] = GRASS
    c.mat[:] = grass
    soil = c.add_material(
        _Material(
            _jitter(rng, (132, 112, 88), 0.12),
            _jitter(rng, (160, 146, 120), 0.12),
            w_low=0.3,
            w_mid=0.1,
            w_fine=0.15,
            grain=7,
        )
    )
    for _ in range(int(rng.integers(0, 5))):
        r = c.m(rng.uniform(8, 24))
        found = c.blob(
            rng.uniform(0, c.width),
            rng.uniform(0, c.height),
            r,
            r * rng.uniform(0.4, 1.0),
            rng.uniform(0, math.pi),
            roughness=rng.uniform(0.5, 1.0),
        )
        if found:
            region, box = found
            c.mask[box][region] = BACKGROUND
            c.mat[box][region] = soil


def _water(c: _Canvas) -> None:
    """A pond or a meandering river; some get bright sky reflections (the study's failure case)."""
    rng = c.rng
    if rng.random() > 0.6:
        return
    water = c.add_material(
        _Material(
            _jitter(rng, (38, 64, 70), 0.2),
            _jitter(rng, (72, 86, 66), 0.2),
            w_low=0.5,
            w_mid=0.05,
            w_fine=0.05,
            grain=3,
        )
    )
    if rng.random() < 0.35:  # river across the image
        horizontal = rng.random() < 0.5
        span, across = (c.width, c.height) if horizontal else (c.height, c.width)
        n = 24
        s = np.linspace(-0.1 * span, 1.1 * span, n)
        phase, wavelength = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.2) * span
        o = across * rng.uniform(0.2, 0.8) + across * rng.uniform(0.05, 0.15) * np.sin(
            2 * math.pi * s / wavelength + phase
        )
        pts = np.stack([s, o], axis=1) if horizontal else np.stack([o, s], axis=1)
        tmp = np.zeros((c.height, c.width), np.float32)
        cv2.polylines(
            tmp, [np.round(pts).astype(np.int32)], False, 1.0, round(c.m(rng.uniform(8, 22)))
        )
        soft = cv2.GaussianBlur(tmp, (0, 0), c.m(1.5))
        noise = _smooth_noise(rng, tmp.shape, c.m(5)) - 0.5
        region = (soft + 0.8 * noise > 0.5) & (soft > 0.2)
        box = (slice(0, c.height), slice(0, c.width))
    else:
        r = c.m(rng.uniform(12, 32))
        found = c.blob(
            rng.uniform(0.1, 0.9) * c.width,
            rng.uniform(0.1, 0.9) * c.height,
            r,
            r * rng.uniform(0.5, 1.0),
            rng.uniform(0, math.pi),
            roughness=rng.uniform(0.6, 1.2),
        )
        if found is None:
            return
        region, box = found
    c.fill_region(region, box, WATER, water)
    if rng.random() < 0.45:  # sky reflections: soft bright patches, still water
        h, w = region.shape
        glare = _smooth_noise(rng, (h, w), c.m(rng.uniform(8, 18)))
        lo = rng.uniform(0.5, 0.7)
        strength = np.clip((glare - lo) / 0.4, 0, 1) ** 1.5 * rng.uniform(0.5, 0.9)
        c.glare[box][region] = strength[region]
        c.sky = _jitter(rng, (205, 214, 222), 0.08)


def _roads(c: _Canvas, grid_angle: float, density: float) -> list[_Road]:
    """A few straight or slightly bent roads: all sidewalks first, then asphalt, then marks."""
    rng = c.rng
    n = int(rng.choice([0, 1, 2, 3], p=[0.1, 0.35, 0.4, 0.15]) + (density > 0.75))
    diag = math.hypot(c.width, c.height)
    asphalt_base = rng.uniform(88, 128)
    concrete = c.add_material(
        _Material(
            _jitter(rng, (168, 164, 156), 0.08),
            _jitter(rng, (186, 182, 172), 0.08),
            w_low=0.2,
            w_mid=0.0,
            w_fine=0.1,
            grain=5,
        )
    )
    roads: list[_Road] = []
    surfaces: list[int] = []
    for _ in range(n):
        angle = grid_angle + math.pi / 2 * int(rng.integers(0, 2)) + rng.normal(0, 0.06)
        p0 = np.array([rng.uniform(0.1, 0.9) * c.width, rng.uniform(0.1, 0.9) * c.height])
        u = np.array([math.cos(angle), math.sin(angle)])
        v = np.array([-u[1], u[0]])
        bend = rng.normal(0, 0.05 * diag) if rng.random() < 0.5 else 0.0
        points = np.array(
            [p0 - diag * u, p0 + rng.uniform(-0.3, 0.3) * diag * u + bend * v, p0 + diag * u]
        )
        road = _Road(points, c.m(rng.uniform(5, 12)))
        if rng.random() < 0.45:
            sidewalks = road.width + 2 * c.m(rng.uniform(1.5, 2.5))
            c.polyline(points, sidewalks, BACKGROUND, concrete)
        grey = asphalt_base + rng.normal(0, 8)
        surfaces.append(
            c.add_material(
                _Material(
                    _jitter(rng, (grey, grey, grey + 4), 0.05),
                    _jitter(rng, (grey + 14, grey + 12, grey + 8), 0.05),
                    w_low=0.35,
                    w_mid=0.05,
                    w_fine=0.15,
                    grain=6,
                )
            )
        )
        roads.append(road)
    for road, surface in zip(roads, surfaces, strict=True):
        c.polyline(road.points, road.width, ROAD, surface)
    for road, surface in zip(roads, surfaces, strict=True):
        _lane_marks(c, road, surface)
    return roads


def _lane_marks(c: _Canvas, road: _Road, surface: int) -> None:
    """Dashed centre line and now and then edge lines, on this road's visible asphalt only."""
    rng = c.rng
    if road.width < c.m(6) or rng.random() < 0.25:
        return
    yellow = rng.random() < 0.3
    paint = c.add_material(
        _Material(
            (215, 180, 60) if yellow else (222, 222, 216),
            (200, 170, 70) if yellow else (200, 200, 196),
            w_low=0.2,
            w_mid=0.0,
            w_fine=0.3,
            grain=10,
        )
    )
    layer = np.zeros_like(c.mat)
    thick = max(1, round(c.m(0.15)))
    dash, gap = c.m(3), c.m(rng.uniform(3, 6))
    t0, t1 = _visible_arc(road, c.width, c.height)
    t = t0 + rng.uniform(0, dash + gap)
    while t < t1:
        p, _ = _point_on(road.points, t)
        q, _ = _point_on(road.points, min(t + dash, t1))
        cv2.line(layer, tuple(np.round(p).astype(int)), tuple(np.round(q).astype(int)), 1, thick)
        t += dash + gap
    if rng.random() < 0.5:
        for side in (-1, 1):
            edge = _offset_polyline(road.points, side * (road.width / 2 - c.m(0.6)))
            cv2.polylines(layer, [np.round(edge).astype(np.int32)], False, 1, thick)
    c.mark(layer, surface, paint)


def _vehicle_materials(c: _Canvas) -> list[int]:
    """Paint colours for the scene's vehicles, with the dark window glass last."""
    rng = c.rng
    picks = rng.choice(len(_VEHICLE_COLORS), size=5, replace=False)
    mats = [
        c.add_material(_Material(col, col, w_low=0, w_mid=0, w_fine=0.2, grain=5))
        for col in (_jitter(rng, _VEHICLE_COLORS[i], 0.06) for i in picks)
    ]
    glass = (30.0, 34.0, 40.0)
    mats.append(c.add_material(_Material(glass, glass, w_low=0, w_mid=0, w_fine=0.2, grain=4)))
    return mats


def _vehicle(
    c: _Canvas, cx: float, cy: float, angle: float, mats: list[int], trucks: bool = True
) -> None:
    """A car (or on roads now and then a truck) unless it would touch another vehicle."""
    rng = c.rng
    big = trucks and rng.random() < 0.06
    length = c.m(rng.uniform(8, 12) if big else rng.uniform(4.2, 5.0))
    width = c.m(rng.uniform(2.4, 2.6) if big else rng.uniform(1.75, 2.0))
    body = _rect(cx, cy, length, width, angle)
    if c.overlaps(body, VEHICLE):
        return
    c.fill_poly(body, VEHICLE, mats[int(rng.integers(len(mats) - 1))], occupy=False)
    if not big:  # windscreen and rear window: dark glass, still 'vehicle'
        u = np.array([math.cos(angle), math.sin(angle)]) * length
        for offset, size in ((0.18, 0.18), (-0.3, 0.12)):
            glass = _rect(cx + u[0] * offset, cy + u[1] * offset, size * length, 0.8 * width, angle)
            c.fill_poly(glass, VEHICLE, mats[-1], occupy=False)


def _traffic(c: _Canvas, roads: list[_Road], mats: list[int], density: float) -> None:
    """Cars in both lanes; rare overall (well under 2% of the pixels), as in FloodNet."""
    rng = c.rng
    for road in roads:
        t0, t1 = _visible_arc(road, c.width, c.height)
        per_100m = rng.uniform(0.3, 3.5) * (0.5 + density)
        for _ in range(int(rng.poisson(per_100m * (t1 - t0) / c.m(100)))):
            p, angle = _point_on(road.points, rng.uniform(t0, t1))
            lane = 1 if rng.random() < 0.5 else -1
            normal = np.array([-math.sin(angle), math.cos(angle)])
            q = p + normal * lane * road.width * rng.uniform(0.18, 0.3)
            _vehicle(c, q[0], q[1], angle + (math.pi if lane < 0 else 0.0), mats)


def _parking_lots(c: _Canvas, roads: list[_Road], mats: list[int]) -> None:
    """Grey lots beside a road (background, coloured much like the road) with parked cars."""
    rng = c.rng
    if not roads or rng.random() > 0.35:
        return
    grey = rng.uniform(95, 140)
    surface = c.add_material(
        _Material(
            _jitter(rng, (grey, grey, grey), 0.05),
            _jitter(rng, (grey + 18, grey + 14, grey + 10), 0.05),
            w_low=0.3,
            w_mid=0.05,
            w_fine=0.15,
            grain=6,
        )
    )
    paint = c.add_material(
        _Material((225, 225, 220), (205, 205, 200), w_low=0, w_mid=0, w_fine=0.2, grain=8)
    )
    occupancy = rng.uniform(0.2, 0.9)
    for _ in range(int(rng.integers(1, 3))):
        road = roads[int(rng.integers(len(roads)))]
        t0, t1 = _visible_arc(road, c.width, c.height)
        if t1 <= t0:
            continue
        p, angle = _point_on(road.points, rng.uniform(t0, t1))
        u = np.array([math.cos(angle), math.sin(angle)])
        v = np.array([-u[1], u[0]]) * (1 if rng.random() < 0.5 else -1)
        depth, length = c.m(rng.uniform(12, 26)), c.m(rng.uniform(20, 50))
        centre = p + v * (road.width / 2 + c.m(rng.uniform(1, 4)) + depth / 2)
        lot = _rect(centre[0], centre[1], length, depth, angle)
        if c.busy_fraction(lot) > 0.1:
            continue
        c.fill_poly(lot, BACKGROUND, surface)
        stall_w, stall_d = c.m(2.6), c.m(5.2)
        layer, stalls = np.zeros_like(c.mat), []
        for row in (-1, 1) if depth >= 2 * stall_d else (-1,):
            edge, inner = row * depth / 2, row * (depth / 2 - stall_d)
            for k in range(int(length // stall_w) + 1):
                a = centre + u * (-length / 2 + k * stall_w)
                p0, p1 = np.round(a + v * edge).astype(int), np.round(a + v * inner).astype(int)
                cv2.line(layer, tuple(p0), tuple(p1), 1, max(1, round(c.m(0.12))))
                if k:
                    stalls.append(a - u * stall_w / 2 + v * (edge + inner) / 2)
        c.mark(layer, surface, paint)
        for q in stalls:
            if rng.random() < occupancy:
                turn = math.pi / 2 + math.pi * (rng.random() < 0.5)
                _vehicle(c, q[0], q[1], angle + turn, mats, trucks=False)


@dataclass
class _Building:
    centre: np.ndarray
    angle: float
    length: float
    depth: float
    away: np.ndarray  # unit vector from the street to the back yard


def _gable(c: _Canvas, rect: np.ndarray, roof: int, sun: np.ndarray, flat: bool) -> None:
    """A roof: two halves split along the ridge, the one facing the sun brighter."""
    if flat:
        c.fill_poly(rect, BUILDING, roof, shade=float(c.rng.uniform(0.95, 1.05)))
        return
    p0, p1, p2, p3 = rect
    m03, m12 = (p0 + p3) / 2, (p1 + p2) / 2
    normal = (p0 - p3) / (np.linalg.norm(p0 - p3) + 1e-6)
    k = c.rng.uniform(0.12, 0.3)
    c.fill_poly(np.array([p0, p1, m12, m03]), BUILDING, roof, shade=1 + k * float(normal @ sun))
    c.fill_poly(np.array([m03, m12, p2, p3]), BUILDING, roof, shade=1 - k * float(normal @ sun))


def _buildings(
    c: _Canvas, roads: list[_Road], grid_angle: float, density: float, sun: np.ndarray
) -> list[_Building]:
    """Houses set back from the roads (rectangles and L-shapes), a few free-standing barns."""
    rng = c.rng
    target = int(round(density * rng.uniform(6, 20) * c.area_ratio))
    roofs = [
        c.add_material(
            _Material(col, _jitter(rng, col, 0.08), w_low=0.15, w_mid=0.05, w_fine=0.25, grain=6)
        )
        for col in (
            _jitter(rng, _ROOF_COLORS[i], 0.1)
            for i in rng.choice(len(_ROOF_COLORS), size=4, replace=False)
        )
    ]
    placed: list[_Building] = []
    for _ in range(target * 5):
        if len(placed) >= target:
            break
        length, depth = c.m(rng.uniform(9, 22)), c.m(rng.uniform(8, 14))
        if roads and rng.random() < 0.8:
            road = roads[int(rng.integers(len(roads)))]
            t0, t1 = _visible_arc(road, c.width, c.height)
            if t1 <= t0:
                continue
            p, angle = _point_on(road.points, rng.uniform(t0, t1))
            away = np.array([-math.sin(angle), math.cos(angle)]) * (1 if rng.random() < 0.5 else -1)
            centre = p + away * (road.width / 2 + c.m(rng.uniform(3, 12)) + depth / 2)
        else:
            angle = grid_angle + rng.normal(0, 0.1)
            centre = np.array([rng.uniform(0, c.width), rng.uniform(0, c.height)])
            away = np.array([-math.sin(angle), math.cos(angle)])
        angle += rng.normal(0, 0.03)
        parts = [_rect(centre[0], centre[1], length, depth, angle)]
        if rng.random() < 0.35:  # L-shape: a wing towards the back yard at one end
            u = np.array([math.cos(angle), math.sin(angle)])
            wing_w, wing_l = length * rng.uniform(0.3, 0.5), depth * rng.uniform(0.6, 1.2)
            end = 1 if rng.random() < 0.5 else -1
            wc = centre + u * end * (length - wing_w) / 2 + away * (depth + wing_l) / 2 * 0.98
            parts.append(_rect(wc[0], wc[1], wing_l, wing_w, angle + math.pi / 2))
        if any(c.busy_fraction(part) > 0.02 for part in parts):
            continue
        roof, flat = roofs[int(rng.integers(len(roofs)))], rng.random() < 0.25
        for part in parts:
            _gable(c, part, roof, sun, flat)
        placed.append(_Building(centre, angle, length, depth, away))
    return placed


def _pools(c: _Canvas, buildings: list[_Building], density: float) -> None:
    """Small bright pools with a concrete deck in some back yards."""
    rng = c.rng
    if not buildings:
        return
    water = c.add_material(
        _Material(
            _jitter(rng, (62, 168, 200), 0.1),
            _jitter(rng, (132, 214, 228), 0.06),
            w_low=0.25,
            w_mid=0.0,
            w_fine=0.3,
            grain=4,
        )
    )
    deck = c.add_material(
        _Material(
            _jitter(rng, (190, 184, 172), 0.06),
            (210, 206, 196),
            w_low=0.2,
            w_mid=0,
            w_fine=0.2,
            grain=5,
        )
    )
    chance = rng.uniform(0.1, 0.6) * (0.4 + density)
    for b in buildings:
        if rng.random() > chance:
            continue
        length, width, rim = (
            c.m(rng.uniform(6, 11)),
            c.m(rng.uniform(3, 5)),
            c.m(rng.uniform(0.6, 1.6)),
        )
        u = np.array([math.cos(b.angle), math.sin(b.angle)])
        centre = (
            b.centre
            + b.away * (b.depth / 2 + c.m(rng.uniform(3, 7)) + width / 2 + rim)
            + u * rng.uniform(-0.3, 0.3) * b.length
        )
        outer = _rect(centre[0], centre[1], length + 2 * rim, width + 2 * rim, b.angle)
        if c.busy_fraction(outer) > 0:
            continue
        c.fill_poly(outer, BACKGROUND, deck)
        c.fill_poly(_rect(centre[0], centre[1], length, width, b.angle), POOL, water)


def _tree(c: _Canvas, x: float, y: float, r: float, mat: int) -> None:
    """A canopy: a crown with a few lobes, so the outline is lumpy, and a dome for shading."""
    rng = c.rng
    lobes = [(x, y, r)]
    for _ in range(int(rng.integers(2, 5))):
        a = rng.uniform(0, 2 * math.pi)
        lobes.append(
            (x + 0.55 * r * math.cos(a), y + 0.55 * r * math.sin(a), r * rng.uniform(0.45, 0.7))
        )
    for lx, ly, lr in lobes:
        centre, radius = (round(lx), round(ly)), max(1, round(lr))
        cv2.circle(c.mask, centre, radius, TREE, -1)
        cv2.circle(c.mat, centre, radius, mat, -1)
        cv2.circle(c.tree_height, centre, radius, float(lr), -1)


def _trees(c: _Canvas, roads: list[_Road], density: float) -> None:
    """Clusters of canopies on open ground that spill over roads and roofs, and street rows."""
    rng = c.rng
    greens = [
        c.add_material(
            _Material(
                _jitter(rng, (30, 58, 32), 0.15),
                _jitter(rng, (76, 104, 50), 0.12),
                w_low=0.12,
                w_mid=0.45,
                w_fine=0.15,
                grain=7,
            )
        )
        for _ in range(3)
    ]
    for _ in range(int(rng.uniform(5, 16) * c.area_ratio * (1.3 - 0.6 * density))):
        for _ in range(6):
            x, y = rng.uniform(0, c.width), rng.uniform(0, c.height)
            if not c.occupied[int(y), int(x)]:
                break
        mat, spread = greens[int(rng.integers(3))], c.m(rng.uniform(3, 12))
        for _ in range(int(rng.integers(2, 12))):
            dx, dy = rng.normal(0, spread, 2)
            _tree(c, x + dx, y + dy, c.m(rng.uniform(2, 5.5)), mat)
    if roads and rng.random() < 0.2 + 0.3 * density:
        road = roads[int(rng.integers(len(roads)))]
        t0, t1 = _visible_arc(road, c.width, c.height)
        side = 1 if rng.random() < 0.5 else -1
        offset = road.width / 2 + c.m(rng.uniform(1.5, 4))
        mat, step = greens[int(rng.integers(3))], c.m(rng.uniform(8, 14))
        for t in np.arange(t0 + rng.uniform(0, step), t1, step):
            p, angle = _point_on(road.points, float(t))
            q = p + np.array([-math.sin(angle), math.cos(angle)]) * side * offset
            _tree(c, q[0], q[1], c.m(rng.uniform(2, 3.5)), mat)


def _shadows_and_relief(c: _Canvas, sun: np.ndarray) -> None:
    """Cast shadows of buildings and trees away from the sun; sunlit and shaded canopy sides."""
    rng = c.rng
    strength = rng.uniform(0.3, 0.55)
    for cls, metres in ((BUILDING, rng.uniform(3, 9)), (TREE, rng.uniform(2, 6))):
        occluder = (c.mask == cls).astype(np.uint8)
        if not occluder.any():
            continue
        length = c.m(metres)
        k = math.ceil(length)
        # dilate() takes the max over src(p + offset); offsets -t*sun for t in [0, L] sweep the
        # object along the shadow direction.
        kernel = np.zeros((2 * k + 1, 2 * k + 1), np.uint8)
        end = (round(k - length * sun[0]), round(k - length * sun[1]))
        cv2.line(kernel, (k, k), end, 1, 1)
        cast = cv2.dilate(occluder, kernel) * (1 - occluder)
        soft = cv2.GaussianBlur(cast.astype(np.float32), (0, 0), max(0.6, c.m(0.25)))
        c.shade *= 1 - strength * soft
    tree = c.mask == TREE
    if tree.any():
        dome = cv2.GaussianBlur(c.tree_height, (0, 0), c.m(1.2))
        gx = cv2.Sobel(dome, cv2.CV_32F, 1, 0, ksize=3) / 8
        gy = cv2.Sobel(dome, cv2.CV_32F, 0, 1, ksize=3) / 8
        lit = np.clip(1 - 0.6 * (gx * sun[0] + gy * sun[1]), 0.55, 1.45)
        c.shade[tree] *= lit[tree]


def _paint(c: _Canvas) -> np.ndarray:
    """Materials, shading and camera effects to an RGB uint8 image."""
    rng = c.rng
    h, w = c.height, c.width
    mats = c.materials
    a = np.array([m.a for m in mats], np.float32)
    b_minus_a = np.array([m.b for m in mats], np.float32) - a
    weights = np.array([(m.w_low, m.w_mid, m.w_fine, m.grain) for m in mats], np.float32)
    low = _standardized(
        _smooth_noise(rng, (h, w), c.m(15)) + 0.5 * _smooth_noise(rng, (h, w), c.m(4))
    )
    mid = _standardized(_smooth_noise(rng, (h, w), max(1.5, c.m(0.8))))
    fine = _standardized(_smooth_noise(rng, (h, w), 2.0))
    # np.take on the material map: a few times faster than fancy indexing.
    w_low, w_mid, w_fine, grain = (np.take(col, c.mat) for col in weights.T)
    t = 0.5 + w_low * low + w_mid * mid + w_fine * fine
    np.clip(t, 0, 1, out=t)
    img = np.take(a, c.mat, axis=0) + np.take(b_minus_a, c.mat, axis=0) * t[..., None]
    if c.glare.any():
        # Only where water is still visible: roads and trees drawn later hide it.
        glare = (c.glare * (c.mask == WATER))[..., None]
        img += glare * (np.array(c.sky, np.float32) - img)
    img *= c.shade[..., None]
    img += (grain * rng.standard_normal((h, w), dtype=np.float32))[..., None]
    # Camera and light: white balance, exposure, a soft illumination gradient, haze, optics.
    gain = rng.uniform(0.92, 1.08, 3).astype(np.float32) * rng.uniform(0.8, 1.15)
    light = 1 + 0.12 * (_smooth_noise(rng, (h, w), max(w, h) / 1.5) - 0.5)
    img *= gain * light[..., None]
    haze = rng.uniform(0, 0.15)
    img = img * (1 - haze) + haze * np.float32(rng.uniform(150, 200))
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 0.9))
    img += 7.0 * (rng.random(img.shape, dtype=np.float32) - 0.5)  # sensor noise, sd 2
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_scene(
    rng: np.random.Generator, width: int, height: int, zoom: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: an RGB uint8 image (H, W, 3) and its class-id mask (H, W) with ids 0..7.

    At `zoom` 1 any size shows a whole 120 m x 90 m tile; `zoom` Z shows 1/Z of it per side
    at Z times the resolution, so small images keep objects (vehicles) several pixels wide.
    """
    px_per_m = (
        _PX_PER_M_AT_512 * math.sqrt(width * height / (512 * 384)) * zoom * rng.uniform(0.8, 1.25)
    )
    c = _Canvas(rng, width, height, px_per_m)
    density = float(rng.random())  # 0: fields and woods, 1: a dense neighbourhood
    grid_angle = rng.normal(0, 0.05) if rng.random() < 0.4 else rng.uniform(0, math.pi / 2)
    sun_angle = rng.uniform(0, 2 * math.pi)
    sun = np.array([math.cos(sun_angle), math.sin(sun_angle)])  # unit vector towards the sun
    _ground(c)
    _water(c)
    roads = _roads(c, grid_angle, density)
    vehicles = _vehicle_materials(c)
    _parking_lots(c, roads, vehicles)
    buildings = _buildings(c, roads, grid_angle, density, sun)
    _pools(c, buildings, density)
    _traffic(c, roads, vehicles, density)
    _trees(c, roads, density)
    _shadows_and_relief(c, sun)
    return _paint(c), c.mask


def _prepare(out: Path, overwrite: bool) -> None:
    """Refuse to mix two generations; with ``overwrite`` remove only files this module wrote."""
    for split in SPLITS:
        for sub in ("image", "mask"):
            folder = out / split / sub
            if not folder.is_dir():
                continue
            files = [p for p in folder.iterdir() if p.is_file()]
            if files and not overwrite:
                raise DatasetError(
                    f"{folder} already holds {len(files)} files; pass --overwrite to replace "
                    "a synthetic set there, or choose another --out"
                )
            foreign = [p for p in files if not p.name.startswith("syn_")]
            if foreign:
                raise DatasetError(
                    f"{folder} holds files this generator did not write (e.g. {foreign[0].name}); "
                    "choose another --out"
                )
            for p in files:
                p.unlink()


def generate(
    out: Path | str,
    n_train: int,
    n_test: int,
    size: tuple[int, int] = (512, 384),
    seed: int = 0,
    n_val: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    zoom: float = 1.0,
) -> Path:
    """Write a synthetic set in the docs/design.md layout; image ``syn_<i>`` comes from rng([seed, i])."""
    width, height = size
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if min(counts.values()) < 0 or sum(counts.values()) == 0:
        raise ConfigError(f"image counts {counts}: need non-negative counts and at least one image")
    if width < MIN_SIZE or height < MIN_SIZE:
        raise ConfigError(f"size {width}x{height}: both sides must be at least {MIN_SIZE} px")
    if seed < 0:
        raise ConfigError(f"seed {seed}: must be a non-negative integer")
    if not 0.25 <= zoom <= 16:
        raise ConfigError(f"zoom {zoom}: must be between 0.25 and 16")
    out = Path(out)
    _prepare(out, overwrite)
    index = 0
    with tqdm(
        total=sum(counts.values()), desc="synthetic", unit="img", disable=not progress
    ) as bar:
        for split in SPLITS:
            if not counts[split]:
                continue
            image_dir, mask_dir = out / split / "image", out / split / "mask"
            try:
                image_dir.mkdir(parents=True, exist_ok=True)
                mask_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatasetError(
                    f"cannot create {image_dir}: {exc}; choose another --out"
                ) from None
            for _ in range(counts[split]):
                image, mask = render_scene(
                    np.random.default_rng([seed, index]), width, height, zoom
                )
                sample_id = f"syn_{index:06d}"
                Image.fromarray(image).save(
                    image_dir / f"{sample_id}.jpg", format="JPEG", quality=JPEG_QUALITY
                )
                Image.fromarray(mask).save(mask_dir / f"{sample_id}.png", format="PNG")
                index += 1
                bar.update()
    log.info(
        "wrote %d train, %d val and %d test images of %dx%d (seed %d) to %s",
        n_train,
        n_val,
        n_test,
        width,
        height,
        seed,
        out,
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "python -m segtune.data.synthetic",
        "Write a synthetic aerial segmentation set in the tiny-FloodNet layout.",
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write")
    parser.add_argument("--train", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--test", type=int, default=50, help="test images (default 50)")
    parser.add_argument("--val", type=int, default=0, help="validation images (default 0)")
    parser.add_argument("--size", default="512x384", help="WIDTHxHEIGHT (default 512x384)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument(
        "--zoom",
        type=float,
        default=1.0,
        help="resolution factor: Z shows 1/Z of the 120x90 m tile per side (default 1)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier synthetic set in --out"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    generate(
        args.out,
        args.train,
        args.test,
        size=parse_hw(args.size)[::-1],
        seed=args.seed,
        n_val=args.val,
        progress=not args.quiet,
        overwrite=args.overwrite,
        zoom=args.zoom,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
