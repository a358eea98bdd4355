"""The server's validation set: labelled volumes every candidate generation is scored on.

A validation set is a folder of ``.npz`` files, one case each, with the arrays ``pixels``
and ``labels`` (``(slices, rows, cols)``), ``pixel_spacing`` (``(row_mm, col_mm)``) and
``site`` (the hospital or protocol the case stands for, so the gate can see a candidate
that helps one site at the cost of another). The files are plain numpy arrays read with
``allow_pickle=False``: a validation set is data, never code. A federation with real data
puts its own de-identified cases into that format; :func:`make_validation_set` writes one
from the synthetic phantom, with every site's protocol.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib.npyio import NpzFile

from dafne_node.durable import write_atomically
from dafne_node.model.train import TrainingExample

LOGGER = logging.getLogger(__name__)

__all__ = [
    "VALIDATION_ARRAYS",
    "ValidationCase",
    "load_validation_set",
    "make_validation_set",
]

VALIDATION_ARRAYS = ("pixels", "labels", "pixel_spacing", "site")


@dataclass(frozen=True)
class ValidationCase:
    """One labelled volume of the validation set and the site it represents."""

    site: str
    name: str
    example: TrainingExample


def make_validation_set(
    folder: Path,
    *,
    sites: Sequence[str] = ("A", "B", "C", "D"),
    per_site: int = 2,
    slices: int = 24,
    seed_base: int = 90_000,
) -> list[Path]:
    """Write a phantom validation set: ``per_site`` studies of each site.

    Case ``i`` of site ``S`` is ``make_study(site=S, seed=seed_base + i, slices=slices)``,
    written to ``site-<S>-<i>.npz``. The phantom's anatomy is drawn from (site, seed), so
    the cases are subjects nobody trained on only if their seeds are far from the ones
    used for training: the bundled model trains on seeds 1000-1047 and is evaluated on
    0-19, nodes and tests use small seeds. The default base, 90 000, leaves a wide gap, so
    the gate measures how a model generalises rather than what it memorised.

    Parameters
    ----------
    folder:
        Where to write; created if needed. It must hold no ``.npz`` files yet: the stored
        scores of earlier generations are only comparable on the same set, so a set is
        never changed in place.
    sites:
        Phantom sites ("A".."D").
    per_site:
        Cases per site (>= 1).
    slices:
        Slices per study.
    seed_base:
        Seed of each site's first case.

    Returns
    -------
    list[Path]
        The files written, in the order written.

    Raises
    ------
    ValueError
        If the folder already holds a validation set, or for an invalid argument (an
        unknown site, a seed or slice count out of range: the message names it).
    """
    from dafne_node.phantom import make_study  # noqa: PLC0415 - only setup needs the phantom

    if per_site < 1:
        raise ValueError(f"per_site must be at least 1, got {per_site}")
    if not sites:
        raise ValueError("sites must name at least one phantom site")
    existing = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    if existing:
        raise ValueError(
            f"validation set folder {folder} already holds {len(existing)} .npz files; "
            "choose an empty folder (scores are comparable only on an unchanged set)")
    written: list[Path] = []
    for site in sites:
        for index in range(per_site):
            study = make_study(site=site, seed=seed_base + index, slices=slices)
            path = folder / f"site-{site}-{index}.npz"
            arrays = {
                "pixels": np.asarray(study.pixels),
                "labels": np.asarray(study.labels),
                "pixel_spacing": np.asarray(study.pixel_spacing, dtype=np.float64),
                "site": np.asarray(site),
            }
            write_atomically(path, partial(_write_npz, arrays=arrays))
            written.append(path)
    LOGGER.info("wrote a validation set of %d phantom cases (sites %s) to %s", len(written),
                ", ".join(sites), folder)
    return written


def _write_npz(stream: BinaryIO, *, arrays: dict[str, np.ndarray]) -> None:
    np.savez(stream, allow_pickle=False, **arrays)


def _case(path: Path, arrays: dict[str, np.ndarray]) -> ValidationCase:
    """Check one file's arrays and build its case; ValueError naming the file."""
    missing = [name for name in VALIDATION_ARRAYS if name not in arrays]
    if missing:
        raise ValueError(f"validation case {path} lacks the arrays {', '.join(missing)}")
    pixels, labels = arrays["pixels"], arrays["labels"]
    spacing, site = arrays["pixel_spacing"], arrays["site"]
    if pixels.ndim != 3 or pixels.shape != labels.shape or 0 in pixels.shape:
        raise ValueError(
            f"validation case {path}: pixels {pixels.shape} and labels {labels.shape} must "
            "be non-empty volumes of the same shape (slices, rows, cols)")
    if pixels.dtype.kind not in "uif" or labels.dtype.kind not in "ui":
        raise ValueError(
            f"validation case {path}: pixels must be numeric and labels unsigned or signed "
            f"integers, got {pixels.dtype} and {labels.dtype}")
    if spacing.shape != (2,) or spacing.dtype.kind not in "uif":
        raise ValueError(
            f"validation case {path}: pixel_spacing must be 2 numbers (row, column mm), got "
            f"shape {spacing.shape} of {spacing.dtype}")
    row_mm, col_mm = (float(v) for v in spacing)
    if not (math.isfinite(row_mm) and math.isfinite(col_mm) and row_mm > 0 and col_mm > 0):
        raise ValueError(
            f"validation case {path}: pixel_spacing must be positive, got {[row_mm, col_mm]}")
    if site.shape != () or site.dtype.kind != "U" or not str(site):
        raise ValueError(
            f"validation case {path}: site must be a non-empty string, got shape "
            f"{site.shape} of {site.dtype}")
    example = TrainingExample(pixels=pixels, labels=labels, pixel_spacing=(row_mm, col_mm))
    return ValidationCase(site=str(site), name=path.stem, example=example)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """All arrays of one ``.npz`` file; ValueError naming the file if it cannot be read."""
    unreadable = f"validation case {path} is not a readable .npz file without pickled objects"
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{unreadable}: {exc}") from None
    if not isinstance(data, NpzFile):
        raise ValueError(f"validation case {path} holds a single array, not an .npz archive")
    with data:
        try:
            return {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{unreadable}: {exc}") from None


def load_validation_set(folder: Path) -> list[ValidationCase]:
    """Read every ``*.npz`` case in ``folder``, sorted by name.

    Raises
    ------
    ValueError
        If the folder does not exist or holds no ``.npz`` files, or naming the file that is
        unreadable, lacks an array, has arrays of the wrong shape or type, or holds pickled
        objects.
    """
    if not folder.is_dir():
        raise ValueError(f"validation set folder {folder} does not exist")
    paths = sorted(folder.glob("*.npz"), key=lambda p: p.name)
    if not paths:
        raise ValueError(f"validation set folder {folder} holds no .npz cases")
    cases = [_case(path, _read_arrays(path)) for path in paths]
    LOGGER.info("loaded %d validation cases from %s (sites %s)", len(cases), folder,
                ", ".join(sorted({case.site for case in cases})))
    return cases
