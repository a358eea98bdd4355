"""Overlap metrics between label maps.

Dice is the metric the Dafne papers report per muscle and the one the federation's
validation gate compares, so it is defined once, here, on plain integer arrays.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

LOGGER = logging.getLogger(__name__)

__all__ = ["dice_per_label", "json_safe", "mean_dice"]


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice coefficient of each label value between two label maps of the same shape.

    ``Dice = 2 |P & T| / (|P| + |T|)``. A label absent from both maps gets ``NaN`` (there is
    nothing to agree or disagree on, and counting it as 1.0 would inflate the mean of a
    study whose slices miss a muscle); :func:`mean_dice` skips NaN values.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    label_list = [int(v) for v in labels]
    # One pass over the voxels: a joint histogram of (pred, truth) pairs.
    size = max([*label_list, int(pred.max(initial=0)), int(truth.max(initial=0))]) + 1
    joint = np.bincount(pred.astype(np.int64).ravel() * size + truth.astype(np.int64).ravel(),
                        minlength=size * size).reshape(size, size)
    result: dict[int, float] = {}
    for value in label_list:
        inter = joint[value, value]
        total = joint[value, :].sum() + joint[:, value].sum()
        result[value] = float("nan") if total == 0 else float(2.0 * inter / total)
    return result


def mean_dice(per_label: Mapping[int, float]) -> float:
    """Mean of the finite Dice values; NaN if there are none."""
    values = [v for v in per_label.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON takes it, recursively.

    NaN and Inf (the Dice of a label absent from both maps) become None, paths strings.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
