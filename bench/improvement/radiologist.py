"""The simulated radiologist of the improvement run: reads the node's SEG, corrects it.

A radiologist opens the node's segmentation in a viewer, fixes what is wrong and saves the
result as a new SEG of the same images, which goes back to the node as a correction. Here
the phantom's ground truth stands in for the radiologist's judgement:

* :func:`read_seg_labels` reads the node's SEG as a label map over its source images, with
  the node's own decoder (``dafne_node.dicom.seg_decode``).
* :func:`correct` replaces the node's labels by the truth, on every slice, or, as people
  do, only on the slices that look wrong (mean Dice below a threshold).
* :func:`poison_label_flip` is the dishonest hospital's version: every muscle consistently
  renamed to another one.
* :func:`write_correction` saves the result as a viewer saves it: highdicom's writer (the
  test harness's, as Python viewers and tools write SEGs), MANUAL segments coded as the
  model's labels, a new series referencing the node's source images.

The numpy parts are pure functions; only the last two touch files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dafne_node.dicom.seg_decode import SourceFrame, decode_segmentation, image_position
from dafne_node.model.labels import LEG_MUSCLES, Label
from dafne_node.model.metrics import dice_per_label, mean_dice
from tests.harness.writers import leg_segments, write_highdicom

__all__ = [
    "Correction",
    "correct",
    "label_permutation",
    "poison_label_flip",
    "read_seg_labels",
    "slice_dice",
    "write_correction",
]


@dataclass(frozen=True)
class Correction:
    """What the radiologist saved.

    Attributes
    ----------
    label_map:
        The corrected ``(slices, rows, cols)`` label map.
    corrected_slices:
        Indices of the slices the radiologist changed, ascending; the others are the
        node's labels as they were.
    """

    label_map: np.ndarray
    corrected_slices: tuple[int, ...]


def slice_dice(predicted: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Mean Dice of each slice over the labels present in either map on that slice.

    Returns
    -------
    np.ndarray
        ``(slices,)`` float; NaN for a slice where no label is present in either map.
    """
    return np.array([mean_dice(dice_per_label(p, t, labels))
                     for p, t in zip(predicted, truth, strict=True)], dtype=float)


def correct(
    predicted: np.ndarray,
    truth: np.ndarray,
    *,
    labels: Sequence[int],
    slice_dice_threshold: float | None = None,
) -> Correction:
    """Correct the node's label map against the truth.

    Parameters
    ----------
    predicted:
        The node's ``(slices, rows, cols)`` label map.
    truth:
        The ground truth of the same shape.
    labels:
        The label values the radiologist judges (the model's muscles).
    slice_dice_threshold:
        None: the radiologist redraws every slice, and ``label_map`` equals ``truth``.
        A value in (0, 1]: only the slices whose :func:`slice_dice` is below it are redrawn
        (set to the truth); the others keep the node's labels, errors included. A slice
        with none of the labels in either map has nothing to judge and is kept.

    Returns
    -------
    Correction
        The corrected map (a new array) and the slices that differ from ``predicted``.

    Raises
    ------
    ValueError
        If the maps are not volumes of the same shape or the threshold is out of range.
    """
    predicted = np.asarray(predicted)
    truth = np.asarray(truth)
    if predicted.shape != truth.shape or predicted.ndim != 3:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} must be volumes "
                         "of the same shape (slices, rows, cols)")
    if slice_dice_threshold is None:
        label_map = truth.copy()
    else:
        if not 0.0 < slice_dice_threshold <= 1.0:
            raise ValueError(f"slice_dice_threshold must be in (0, 1], got "
                             f"{slice_dice_threshold}")
        dice = slice_dice(predicted, truth, labels)
        redraw = np.array([not math.isnan(d) and d < slice_dice_threshold for d in dice],
                          dtype=bool)
        label_map = np.where(redraw[:, None, None], truth, predicted).astype(truth.dtype)
    changed = np.flatnonzero((label_map != predicted).any(axis=(1, 2)))
    return Correction(label_map=label_map, corrected_slices=tuple(int(i) for i in changed))


def label_permutation(labels: Sequence[int], *, seed: int) -> dict[int, int]:
    """The label-flipped hospital's renaming: a seeded random derangement of ``labels``.

    Every label is sent to another label of the list (no label keeps its name, so the
    poison is as strong as a consistent relabelling can be), the same for the same
    ``labels`` and ``seed``. A single label maps to itself.
    """
    values = [int(v) for v in labels]
    if len(set(values)) != len(values):
        raise ValueError(f"labels must be distinct: {values}")
    rng = np.random.default_rng([0xF11B, seed])
    while True:
        order = rng.permutation(len(values))
        if len(values) < 2 or not np.any(order == np.arange(len(values))):
            return {value: values[int(j)] for value, j in zip(values, order, strict=True)}


def poison_label_flip(label_map: np.ndarray, *, labels: Sequence[int], seed: int) -> np.ndarray:
    """``label_map`` with the muscles renamed by :func:`label_permutation`.

    Background and values not in ``labels`` are kept. Returns a new array of the same dtype.
    """
    label_map = np.asarray(label_map)
    mapping = label_permutation(labels, seed=seed)
    out = label_map.copy()
    for source, target in mapping.items():
        out[label_map == source] = target
    return out


def write_correction(sources: Sequence[Path], label_map: np.ndarray, out: Path) -> Path:
    """Save ``label_map`` as a viewer's corrected SEG of the node's series.

    highdicom, BINARY, MANUAL segments coded as the model's muscles (``leg_segments``), a
    new series; ``label_map[i]`` belongs to ``sources[i]``.

    Raises
    ------
    ValueError
        If the map does not fit the sources or holds values that are no muscle.
    """
    return write_highdicom(list(sources), np.asarray(label_map), leg_segments(), Path(out),
                           algorithm_type="MANUAL")


def read_seg_labels(
    seg_path: Path,
    sources: Sequence[Path],
    *,
    labels: Sequence[Label] = LEG_MUSCLES,
) -> np.ndarray:
    """The SEG at ``seg_path`` as a ``(len(sources), rows, cols)`` label map on ``sources``.

    Decoded as the node decodes corrections: segments matched to ``labels`` (the model's,
    from its manifest) by type code or name, frames placed on the source images by
    reference or plane position; values are ``Label.value``, 0 elsewhere.

    Raises
    ------
    dafne_node.dicom.seg_decode.SegmentationError
        If the SEG does not fit the sources or no segment maps to a label.
    """
    datasets = [dcmread(path, stop_before_pixels=True) for path in sources]
    if not datasets:
        raise ValueError("no source images")
    frames = [SourceFrame(str(ds.SOPInstanceUID), 1, image_position(ds)) for ds in datasets]
    decoded = decode_segmentation(dcmread(seg_path), labels, frames,
                                  matrix=(int(datasets[0].Rows), int(datasets[0].Columns)))
    return decoded.label_map
