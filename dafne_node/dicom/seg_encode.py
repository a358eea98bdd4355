"""Encode a label map as a DICOM Segmentation with highdicom.

The SEG is what radiologists see in their viewer and later correct, so it must
be read by every viewer: BINARY segments, one per structure, each with SNOMED CT
category and type codes, the algorithm that made it, and references to the
source images so that viewers overlay it on the right slices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dafne_node import __version__
from dafne_node.model.labels import Label

LOGGER = logging.getLogger(__name__)

MANUFACTURER = "Dafne Node"


@dataclass(frozen=True)
class SegmentationAlgorithm:
    """Who or what produced a segmentation, recorded in every segment.

    Attributes
    ----------
    name:
        Model name, e.g. ``"Dafne leg"``; also the start of the Series Description.
    version:
        Model generation as text, e.g. ``"g1"``.
    kind:
        ``AUTOMATIC`` for model output, ``MANUAL`` for ground truth or edits.
    """

    name: str
    version: str
    kind: Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"] = "AUTOMATIC"

    @property
    def series_description(self) -> str:
        """Series Description shown in PACS worklists, e.g. ``Dafne leg g1``."""
        return f"{self.name} {self.version}"


def encode_segmentation(
    label_map: np.ndarray,
    sources: Sequence[Dataset],
    labels: Sequence[Label],
    algorithm: SegmentationAlgorithm,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 900,
    instance_number: int = 1,
    series_description: str | None = None,
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM-SEG of ``label_map`` over ``sources``.

    Parameters
    ----------
    label_map:
        ``(frames, rows, cols)`` integer array; value ``label.value`` marks that
        structure, 0 is background. Frames follow ``sources`` order (one frame
        per single-frame source image, or the frames of one multi-frame image).
    sources:
        The source image datasets (pixel data not needed). The SEG joins their
        study and references each of them.
    labels:
        The structures the values in ``label_map`` stand for. Only structures
        present in ``label_map`` become segments: an empty segment tells a
        radiologist nothing and some viewers reject it.
    algorithm:
        Recorded as the segment algorithm and used for the Series Description.
    series_instance_uid, sop_instance_uid:
        Passed in rather than generated so that a resend of the same job
        produces the very same instance (idempotent delivery to PACS).
    series_number:
        Series Number shown in PACS; high by convention for derived objects.
    instance_number:
        Instance Number; a newer SEG of the same series has a higher one.
    series_description:
        Overrides the default ``"<model name> <generation>"``.

    Returns
    -------
    highdicom.seg.Segmentation
        Explicit VR Little Endian, empty frames omitted.

    Raises
    ------
    ValueError
        If the label map does not match the sources, holds values that are not
        labels, or contains no structure at all.
    """
    frame_count = sum(int(getattr(ds, "NumberOfFrames", 1)) for ds in sources)
    if label_map.ndim != 3 or label_map.shape[0] != frame_count:
        raise ValueError(
            f"label map shape {label_map.shape} does not match {frame_count} source frames"
        )
    first = sources[0]
    if label_map.shape[1:] != (first.Rows, first.Columns):
        raise ValueError(
            f"label map frames are {label_map.shape[1:]}, source images are "
            f"{(first.Rows, first.Columns)}"
        )
    by_value = {label.value: label for label in labels}
    present = [int(v) for v in np.unique(label_map) if v != 0]
    unknown = [v for v in present if v not in by_value]
    if unknown:
        raise ValueError(f"label map holds values {unknown} that are not labels")
    if not present:
        raise ValueError("the label map contains none of the labelled structures")

    segment_labels = [by_value[v] for v in present]
    relabelled = _renumber(label_map, [label.value for label in segment_labels])
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.DCM.ArtificialIntelligence,
        version=algorithm.version,
        source=MANUFACTURER,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label.name,
            segmented_property_category=label.category_code,
            segmented_property_type=label.type_code,
            algorithm_type=algorithm.kind,
            algorithm_identification=algorithm_id if algorithm.kind != "MANUAL" else None,
            tracking_id=label.key,
            tracking_uid=hd.UID(),
        )
        for number, label in enumerate(segment_labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=relabelled,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description or algorithm.series_description,
        content_label="DAFNE",
        content_description=f"{algorithm.series_description} segmentation",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
    )
    LOGGER.debug(
        "encoded SEG %s: %d segments over %d source frames", sop_instance_uid,
        len(descriptions), frame_count,
    )
    return seg


def _renumber(label_map: np.ndarray, values: list[int]) -> np.ndarray:
    """Map label values to consecutive segment numbers 1..n, as highdicom requires."""
    lookup = np.zeros(int(label_map.max()) + 1, dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        lookup[value] = number
    return lookup[label_map]
