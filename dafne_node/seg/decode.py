"""Decode a DICOM-SEG into a label map aligned with its source images.

Segments are matched to labels by their SNOMED CT type code, not by segment
number or name: a viewer that saves a radiologist's correction may renumber or
rename segments, but keeps the coded meaning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dafne_node.labels import Label

LOGGER = logging.getLogger(__name__)


class SegmentationError(ValueError):
    """A DICOM-SEG that cannot be turned into a label map, with the reason."""


@dataclass(frozen=True)
class DecodedSegmentation:
    """A SEG as a label map plus what it says about itself.

    Attributes
    ----------
    label_map:
        ``(frames, rows, cols)`` uint8 in the order of the source SOP Instance
        UIDs asked for; values are ``Label.value``.
    source_sop_instance_uids:
        The source instances, in frame order of ``label_map``.
    algorithm_types:
        Segment Algorithm Type of each decoded label value (AUTOMATIC, MANUAL…).
    ignored_segments:
        ``"number: label (code)"`` for segments whose type matches no label.
    """

    label_map: np.ndarray
    source_sop_instance_uids: tuple[str, ...]
    algorithm_types: dict[int, str]
    ignored_segments: tuple[str, ...] = field(default=())


def decode_segmentation(
    seg_dataset: Dataset,
    labels: Sequence[Label],
    source_sop_instance_uids: Sequence[str] | None = None,
) -> DecodedSegmentation:
    """Turn ``seg_dataset`` into a label map over its source images.

    Parameters
    ----------
    seg_dataset:
        A Segmentation Storage dataset (BINARY or FRACTIONAL).
    labels:
        The structures to look for; matched by SNOMED CT type code.
    source_sop_instance_uids:
        Frame order of the result. Defaults to the instances the SEG references,
        in the order it lists them.

    Raises
    ------
    SegmentationError
        If the dataset is not a readable SEG, references none of the requested
        sources, or has no segment matching a label.
    """
    try:
        seg = hd.seg.Segmentation.from_dataset(seg_dataset, copy=False)
    except (AttributeError, ValueError, KeyError, TypeError) as exc:
        raise SegmentationError(f"not a readable DICOM-SEG: {exc}") from exc

    by_code = {(lbl.type_code.value, lbl.type_code.scheme_designator): lbl for lbl in labels}
    matched: dict[int, Label] = {}
    algorithm_types: dict[int, str] = {}
    ignored: list[str] = []
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        code = description.segmented_property_type
        label = by_code.get((code.value, code.scheme_designator))
        if label is None:
            ignored.append(f"{number}: {description.segment_label} ({code.value} {code.meaning})")
            continue
        matched[number] = label
        algorithm_types[label.value] = description.algorithm_type.value
    if not matched:
        raise SegmentationError(
            "none of the segments is a known structure; segments: " + "; ".join(ignored)
        )
    if ignored:
        LOGGER.info("SEG %s: ignoring segments %s", seg.SOPInstanceUID, "; ".join(ignored))

    if source_sop_instance_uids is None:
        source_sop_instance_uids = [uid for _, _, uid in seg.get_source_image_uids()]
    numbers = list(matched)
    try:
        masks = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(source_sop_instance_uids),
            segment_numbers=numbers,
            combine_segments=False,
            ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise SegmentationError(f"SEG frames do not map onto the source images: {exc}") from exc

    label_map = np.zeros(masks.shape[:3], dtype=np.uint8)
    for index, number in enumerate(numbers):
        label_map[masks[..., index] > 0] = matched[number].value
    return DecodedSegmentation(
        label_map=label_map,
        source_sop_instance_uids=tuple(source_sop_instance_uids),
        algorithm_types=algorithm_types,
        ignored_segments=tuple(ignored),
    )
