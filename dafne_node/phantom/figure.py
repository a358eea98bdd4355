"""The documentation figure: one mid-calf slice of each site with the ground-truth outlines.

Why it exists: the phantom is only useful if it looks like the images radiologists see and if the
four sites really differ. The figure shows the same synthetic subject scanned with each site's
protocol, so the differences are the protocol's alone, with the six labels outlined.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dafne_node.model.labels import LEG_MUSCLES
from dafne_node.phantom.render import PhantomStudy, make_study
from dafne_node.phantom.sites import SITES

LOGGER = logging.getLogger(__name__)

LABEL_COLOURS = {
    "soleus": "#e6194b",
    "gastrocnemius_medial": "#3cb44b",
    "gastrocnemius_lateral": "#ffe119",
    "tibialis_anterior": "#4363d8",
    "extensor_digitorum_longus": "#f58231",
    "peroneus": "#f032e6",
}
"""Outline colour per label key: distinct hues that stay apart on grey images."""

DOCS_SEED = 2
"""Subject shown in docs/phantoms.png (average build, typical subcutaneous fat)."""


def write_site_figure(path: Path, seed: int = 0) -> Path:
    """Render the mid-calf slice of subject ``seed`` at sites A-D side by side into ``path``.

    Returns the path written. The file type follows the suffix (PNG for the docs).
    """
    studies = [make_study(site, seed, subject_seed=seed) for site in SITES]
    extent = _body_extent(studies[0])
    # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
    fig = Figure(figsize=(5.2 * len(studies), 3.6), facecolor="white")
    axes = fig.subplots(1, len(studies))
    for ax, study in zip(np.atleast_1d(axes), studies, strict=True):
        _panel(ax, study, extent)
    handles = [Line2D([0], [0], color=LABEL_COLOURS[label.key], lw=2.5, label=label.name)
               for label in LEG_MUSCLES]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=10)
    fig.suptitle(f"Synthetic lower-leg MRI phantom: one subject (seed {seed}) scanned with the "
                 "four site protocols, mid-calf slice, ground-truth labels outlined", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    LOGGER.info("wrote phantom figure %s", path)
    return path


def _mid_slice(study: PhantomStudy) -> int:
    return study.pixels.shape[0] // 2


def _grid(study: PhantomStudy) -> tuple[np.ndarray, np.ndarray]:
    """Patient x (columns) and y (rows) coordinates of pixel centres, mm."""
    x0, y0 = study.image_positions[0, :2]
    rows, cols = study.pixels.shape[1:]
    return (x0 + study.pixel_spacing[1] * np.arange(cols),
            y0 + study.pixel_spacing[0] * np.arange(rows))


def _body_extent(study: PhantomStudy, margin: float = 8.0) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) in mm around both legs, for a common view of all sites."""
    x, y = _grid(study)
    body = study.tissues[_mid_slice(study)] > 0
    cols = x[body.any(axis=0)]
    rows = y[body.any(axis=1)]
    return (cols.min() - margin, cols.max() + margin, rows.max() + margin, rows.min() - margin)


def _panel(ax: Axes, study: PhantomStudy, extent: tuple[float, float, float, float]) -> None:
    """Draw one site's slice in patient millimetres with the label outlines."""
    k = _mid_slice(study)
    x, y = _grid(study)
    half_x, half_y = study.pixel_spacing[1] / 2, study.pixel_spacing[0] / 2
    image_extent = (x[0] - half_x, x[-1] + half_x, y[-1] + half_y, y[0] - half_y)
    centre, width = study.window
    ax.imshow(study.pixels[k], cmap="gray", vmin=centre - width / 2, vmax=centre + width / 2,
              extent=image_extent, interpolation="bilinear")
    for label in LEG_MUSCLES:
        mask = (study.labels[k] == label.value).astype(np.float32)
        if mask.any():
            ax.contour(x, y, mask, levels=[0.5], colors=[LABEL_COLOURS[label.key]],
                       linewidths=0.9)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    protocol = study.protocol
    rows = study.pixels.shape[1]
    ax.set_title(
        f"Site {study.site}: {protocol.contrast}, {protocol.manufacturer.split()[0].title()}\n"
        f"{rows}x{rows}, {study.pixel_spacing[0]:.2f} mm, TR/TE "
        f"{protocol.repetition_time_ms:g}/{protocol.echo_time_ms:g} ms", fontsize=10)
    ax.text(0.01, 0.02, "R", color="white", transform=ax.transAxes, fontsize=9)
    ax.text(0.97, 0.02, "L", color="white", transform=ax.transAxes, fontsize=9)


def main(argv: list[str] | None = None) -> int:
    """``python -m dafne_node.phantom.figure [PATH] [--seed N]``: (re)make the docs figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=Path("docs/phantoms.png"))
    parser.add_argument("--seed", type=int, default=DOCS_SEED)
    args = parser.parse_args(argv)
    write_site_figure(args.path, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
