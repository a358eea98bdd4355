"""Validation Dice against model generation, both arms in one figure.

matplotlib is imported inside ``plot_dice`` so that importing this module (and the driver)
stays light; the figure is a bare ``Figure`` rendered by Agg, leaving pyplot's global state
and backend alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

from bench.improvement.stats import DiceRecord, arms, mean_dice

LOGGER = logging.getLogger(__name__)

SITE_MARKERS = ("s", "^", "v", "D", "x", "+", "<", ">")
"""Marker of each site's thin dashed line (sorted sites, cycled), the same for every arm."""


def plot_dice(records: Iterable[DiceRecord], out_png: Path, *, title: str) -> Path:
    """Draw mean validation Dice per generation for every arm into ``out_png``; return it.

    Per arm (colours in the order the arms first appear): a thick line, the mean over all
    validation datasets, with a band of +- one standard error over datasets; and a thin
    dashed line per site (mean over that site's datasets), one marker per site. The same
    records give the same bytes (no timestamp or software version in the PNG).
    """
    from matplotlib.figure import Figure  # noqa: PLC0415 (keeps the import light)
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    records = list(records)
    if not records:
        raise ValueError("records: nothing to plot")
    sites = sorted({r.site for r in records})
    markers = {site: SITE_MARKERS[i % len(SITE_MARKERS)] for i, site in enumerate(sites)}
    present = {(r.arm, r.site) for r in records}
    fig = Figure(figsize=(10, 5), facecolor="white")
    ax = fig.subplots()
    handles = []
    for i, arm in enumerate(arms(records)):
        colour = f"C{i}"
        overall = mean_dice(records, arm=arm)
        x = list(overall)
        mean = [overall[g].mean for g in x]
        sem = [0.0 if math.isnan(overall[g].sem) else overall[g].sem for g in x]
        ax.fill_between(x, [m - s for m, s in zip(mean, sem, strict=True)],
                        [m + s for m, s in zip(mean, sem, strict=True)],
                        color=colour, alpha=0.2, linewidth=0)
        (line,) = ax.plot(x, mean, color=colour, linewidth=2.5, marker="o", markersize=4,
                          label=f"{arm}: mean of all datasets (± SE)")
        handles.append(line)
        for site in (s for s in sites if (arm, s) in present):
            per_site = mean_dice(records, arm=arm, site=site)
            ax.plot(list(per_site), [m.mean for m in per_site.values()], color=colour,
                    linewidth=0.8, alpha=0.7, linestyle="--", marker=markers[site],
                    markersize=3.5)
    handles += [Line2D([0], [0], color="0.4", linewidth=0.8, linestyle="--",
                       marker=markers[site], markersize=3.5, label=f"site {site} mean")
                for site in sites]
    ax.set_xlabel("model generation (0 = root)")
    ax.set_ylabel("validation Dice (mean over datasets)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, metadata={"Software": None})
    LOGGER.info("wrote Dice plot %s", out_png)
    return out_png


__all__ = ["plot_dice"]
