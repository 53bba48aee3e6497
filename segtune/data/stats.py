"""Dataset statistics: images, sizes and class pixel shares per split, as a table and a chart.

    python -m segtune.data.stats data/tiny-floodnet --plot class_shares.png

The shares tell whether a sweep needs class weights (the study's vehicles and pools are rare)
and whether a synthetic or converted set looks like the real one. Checking every pair is the
dataset module's job; this tool reports what that check counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from segtune.classes import CLASS_NAMES, IGNORE_COLOR, PALETTE
from segtune.cli import check_out_folder, command_parser, run_cli, setup_logging
from segtune.data.dataset import SPLITS, available_splits, scan_split
from segtune.errors import DatasetError

log = logging.getLogger(__name__)

IGNORED = "ignored"
SHARE_COLUMNS = (*CLASS_NAMES, IGNORED)


def _present_splits(root: Path) -> list[str]:
    if not root.is_dir():
        raise DatasetError(
            f"dataset root {root} does not exist; pass a folder with train/mask and train/image"
        )
    splits = available_splits(root)
    if not splits:
        raise DatasetError(
            f"{root} holds none of {'/'.join(SPLITS)}/image; expected ROOT/<split>/image/<id>.jpg"
        )
    return splits


def _split_stats(root: Path, split: str, progress: bool = False) -> dict[str, object]:
    """Image count, the set of image sizes and the pixel count per class, plus ignored pixels.

    The dataset's own check (scan_split) counts the pixels while it validates the masks.
    """
    samples = scan_split(root, split, progress=progress)
    counts = np.sum([s.class_pixels for s in samples], axis=0, dtype=np.int64)
    total = sum(s.width * s.height for s in samples)
    return {
        "images": len(samples),
        "sizes": {(s.width, s.height) for s in samples},
        "counts": counts,
        "ignored": total - int(counts.sum()),
    }


def _shares(stats: dict[str, object]) -> dict[str, float]:
    counts = stats["counts"]
    total = max(int(counts.sum()) + stats["ignored"], 1)
    shares = {name: float(counts[i]) / total for i, name in enumerate(CLASS_NAMES)}
    shares[IGNORED] = stats["ignored"] / total
    return shares


def class_pixel_shares(root: Path | str, split: str) -> dict[str, float]:
    """Share of the split's mask pixels per class name, plus ``ignored``; they sum to 1."""
    root = Path(root)
    if split not in _present_splits(root):
        raise DatasetError(f"{root / split} does not exist; splits: {SPLITS}")
    return _shares(_split_stats(root, split))


def _size_text(sizes: set[tuple[int, int]]) -> str:
    if len(sizes) <= 3:
        return ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
    smallest = min(sizes, key=lambda s: s[0] * s[1])
    largest = max(sizes, key=lambda s: s[0] * s[1])
    return f"{len(sizes)} sizes, {smallest[0]}x{smallest[1]} .. {largest[0]}x{largest[1]}"


def compute_stats(root: Path | str, progress: bool = False) -> pd.DataFrame:
    """One row per present split: ``images``, ``sizes`` and the share columns of SHARE_COLUMNS."""
    root = Path(root)
    rows = {}
    for split in _present_splits(root):
        stats = _split_stats(root, split, progress)
        rows[split] = {
            "images": stats["images"],
            "sizes": _size_text(stats["sizes"]),
            **_shares(stats),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def format_stats(stats: pd.DataFrame) -> str:
    """Split summary, then the shares in percent with classes as rows (easier to compare)."""
    summary = stats[["images", "sizes"]].to_string()
    shares = (stats[list(SHARE_COLUMNS)].T * 100).round(2)
    shares.index.name = "pixel share (%)"
    return f"{summary}\n\n{shares.to_string()}"


def plot_shares(stats: pd.DataFrame, path: Path | str, title: str = "") -> Path:
    """Grouped bar chart: one group per split, one bar per class in its palette colour."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe on headless nodes

    path = Path(path)
    columns = [c for c in SHARE_COLUMNS if c != IGNORED or stats[IGNORED].any()]
    colours = [
        *(tuple(v / 255 for v in rgb) for rgb in PALETTE),
        tuple(v / 255 for v in IGNORE_COLOR),
    ]
    fig = Figure(figsize=(2.5 + 2.2 * len(stats), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(columns)
    x = np.arange(len(stats))
    for k, name in enumerate(columns):
        ax.bar(
            x + (k - (len(columns) - 1) / 2) * width,
            stats[name].to_numpy() * 100,
            width,
            label=name,
            color=colours[SHARE_COLUMNS.index(name)],
            edgecolor="#333333",
            linewidth=0.8,
        )
    ax.set_xticks(
        x, [f"{split} ({n})" for split, n in zip(stats.index, stats["images"], strict=True)]
    )
    ax.set_ylabel("pixel share (%)")
    ax.set_title(title or "class pixel shares")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(
        "python -m segtune.data.stats",
        "Images, sizes and class pixel shares of each split of a dataset root.",
    )
    parser.add_argument("root", type=Path, help="dataset root (ROOT/<split>/image|mask)")
    parser.add_argument("--plot", type=Path, help="also write a bar chart of the shares (PNG)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.plot:
        check_out_folder(args.plot.parent, "--plot")  # before the whole dataset is read
    stats = compute_stats(args.root, progress=not args.quiet)
    print(format_stats(stats))
    if args.plot:
        log.info(
            "wrote %s", plot_shares(stats, args.plot, title=f"class pixel shares: {args.root}")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
