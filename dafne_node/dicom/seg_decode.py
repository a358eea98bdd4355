"""Decode a DICOM-SEG from any viewer into a label map over the node's source images.

A radiologist's correction reaches the node as a SEG written by whatever the viewer uses
(OHIF's dcmjs or Cornerstone adapters, 3D Slicer's dcmqi, highdicom-based tools), and
those writers disagree on almost everything but the pixels:

* Segments are renumbered, reordered, some are left out and others added; OHIF replaces
  the codes with SRT T-D0050 "Tissue" and keeps only the Segment Label. So segments are
  matched to the model's labels by SNOMED CT type code first and by label name (with
  configurable aliases) second, and whatever maps to nothing is reported, never guessed.
* Frames are tied to source images by per-frame Source Image references, which may lack
  the SOP Class, the Purpose of Reference or the Spatial Locations Preserved flag (OHIF),
  or cover only the images with segment data (dcmqi). Where a frame has no usable
  reference, its plane position places it on a source slice.
* BINARY (bit-packed), FRACTIONAL (thresholded at half the maximum; dcmjs stores 1 under
  a maximum of 255, which is a mask) and LABELMAP segmentations, native or RLE Lossless
  (dcmjs), geometry in the shared or only in the per-frame functional groups.

The decoder reads the data set with pydicom alone (highdicom insists on the attributes
these writers leave out), checks the declared size before decoding anything, and raises
:class:`SegmentationError` with a reason a person can act on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import SegmentationStorage

from dafne_node.dicom.pixels import MAX_IMAGE_VOXELS, MAX_MATRIX
from dafne_node.model.labels import Label

LOGGER = logging.getLogger(__name__)

__all__ = [
    "ANATOMICAL_STRUCTURE_CATEGORIES",
    "DecodedSegmentation",
    "SegmentInfo",
    "SegmentationError",
    "SourceFrame",
    "decode_segmentation",
    "image_position",
    "map_segments",
    "read_segments",
    "referenced_uids",
    "source_frames_of",
]

ANATOMICAL_STRUCTURE_CATEGORIES = frozenset({
    ("91723000", "SCT"),  # DICOM's "Anatomical Structure" (CID 7150)
    ("123037004", "SCT"),  # "Body structure", what 3D Slicer's terminology writes
    ("T-D000A", "SRT"),  # the retired SNOMED RT code of older writers
})
"""Categories under which a segment is a body structure (informational: a segment whose
type code is a model label maps whatever category it is filed under)."""


class SegmentationError(ValueError):
    """A DICOM-SEG that cannot be turned into a label map, with the reason."""


@dataclass(frozen=True)
class SourceFrame:
    """One source image frame a SEG frame can be placed on.

    Attributes
    ----------
    sop_instance_uid:
        The source image.
    frame_number:
        1-based frame of a multi-frame source; 1 for single-frame images.
    position:
        Image Position (Patient) of the frame in mm, when known; lets a SEG frame without
        a usable reference be placed by its plane position.
    """

    sop_instance_uid: str
    frame_number: int = 1
    position: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class SegmentInfo:
    """What a SEG says about one of its segments."""

    number: int
    label: str
    type_code: tuple[str, str, str]
    """(Code Value, Coding Scheme Designator, Code Meaning)."""
    category_code: tuple[str, str, str]
    algorithm_type: str

    def describe(self) -> str:
        """``"3: Tibia (12611008 Tibia)"``, as reports and logs name a segment."""
        return f"{self.number}: {self.label} ({self.type_code[0]} {self.type_code[2]})"


@dataclass(frozen=True)
class DecodedSegmentation:
    """A SEG as a label map over the source frames it was decoded onto.

    Attributes
    ----------
    label_map:
        ``(frames, rows, cols)`` uint8 in the order of the source frames; values are
        ``Label.value``, 0 where no mapped segment is.
    source_frames:
        The source frames, in the order of ``label_map``.
    labels:
        The model labels some segment mapped to (they may be empty in the image).
    unmapped:
        The segments that map to no label (``SegmentInfo.describe``).
    algorithm_types:
        Segment Algorithm Type of each mapped label value (AUTOMATIC, MANUAL…).
    """

    label_map: np.ndarray
    source_frames: tuple[SourceFrame, ...]
    labels: tuple[Label, ...]
    unmapped: tuple[str, ...] = ()
    algorithm_types: dict[int, str] = field(default_factory=dict)

    @property
    def source_sop_instance_uids(self) -> tuple[str, ...]:
        """The source instances in frame order (one per frame for single-frame sources)."""
        return tuple(frame.sop_instance_uid for frame in self.source_frames)


def decode_segmentation(
    seg: Dataset,
    labels: Sequence[Label],
    source_frames: Sequence[SourceFrame] | None = None,
    *,
    aliases: Mapping[str, Iterable[str]] | None = None,
    matrix: tuple[int, int] | None = None,
) -> DecodedSegmentation:
    """Turn ``seg`` into a label map over ``source_frames``.

    Parameters
    ----------
    seg:
        A Segmentation Storage data set (BINARY, FRACTIONAL or LABELMAP).
    labels:
        The model's labels (from its manifest).
    source_frames:
        Frame order of the result. Defaults to the frames the SEG itself references, in
        the order it lists them, placed by the SEG's own plane positions.
    aliases:
        Extra segment labels per label key (``{"soleus": ["SOL"]}``), for viewers that
        keep only the name.
    matrix:
        Rows and columns of the source images, when known: frames of another size are
        refused (a SEG drawn on a resampled grid).

    Raises
    ------
    SegmentationError
        If the data set is not a readable SEG, no segment maps to a label, a frame lies
        on no source frame, or the frames do not fit the source geometry.
    """
    _check_is_seg(seg)
    segments = read_segments(seg)
    mapping, unmapped = map_segments(segments, labels, aliases or {})
    if not mapping:
        raise SegmentationError(
            "no segment maps to a model label; segments: "
            + ("; ".join(unmapped) or "none")
        )
    if unmapped:
        LOGGER.info("SEG %s: segments not mapped to a label: %s",
                    seg.get("SOPInstanceUID", "?"), "; ".join(unmapped))
    frames = tuple(source_frames) if source_frames is not None else source_frames_of(seg)
    if not frames:
        raise SegmentationError("the SEG references no source image")
    pixels = _frame_masks(seg)
    if matrix is not None and pixels.shape[1:] != tuple(matrix):
        raise SegmentationError(
            f"frames are {pixels.shape[1]}x{pixels.shape[2]} pixels, the source images "
            f"{matrix[0]}x{matrix[1]}: the SEG does not match the source geometry")
    groups = seg.get("PerFrameFunctionalGroupsSequence", [])
    if len(groups) != pixels.shape[0]:
        raise SegmentationError(
            f"{len(groups)} per-frame functional groups for {pixels.shape[0]} frames")
    placement = _place_frames(seg, frames, groups)
    segment_of_frame = _segment_numbers(seg, groups)

    label_map = np.zeros((len(frames), pixels.shape[1], pixels.shape[2]), dtype=np.uint8)
    for index, target in enumerate(placement):
        if target is None:
            continue
        if segment_of_frame is None:  # LABELMAP: pixel values are segment numbers
            for number, label in mapping.items():
                label_map[target][pixels[index] == number] = label.value
        elif segment_of_frame[index] in mapping:
            label_map[target][pixels[index] > 0] = mapping[segment_of_frame[index]].value
    by_number = {segment.number: segment for segment in segments}
    return DecodedSegmentation(
        label_map=label_map,
        source_frames=frames,
        labels=tuple(sorted(set(mapping.values()), key=lambda label: label.value)),
        unmapped=tuple(unmapped),
        algorithm_types={label.value: by_number[number].algorithm_type
                         for number, label in mapping.items()},
    )


def read_segments(seg: Dataset) -> list[SegmentInfo]:
    """The segments a SEG declares, in its order.

    Raises
    ------
    SegmentationError
        If the Segment Sequence is missing or a segment has no number.
    """
    items = seg.get("SegmentSequence")
    if not items:
        raise SegmentationError("the SEG has no Segment Sequence")
    segments = []
    for item in items:
        number = item.get("SegmentNumber")
        if number is None:
            raise SegmentationError("a segment has no Segment Number")
        segments.append(SegmentInfo(
            number=int(number),
            label=str(item.get("SegmentLabel", "") or ""),
            type_code=_code(item, "SegmentedPropertyTypeCodeSequence"),
            category_code=_code(item, "SegmentedPropertyCategoryCodeSequence"),
            algorithm_type=str(item.get("SegmentAlgorithmType", "") or ""),
        ))
    return segments


def map_segments(
    segments: Sequence[SegmentInfo],
    labels: Sequence[Label],
    aliases: Mapping[str, Iterable[str]],
) -> tuple[dict[int, Label], list[str]]:
    """Map segment numbers to labels: SNOMED CT type code first, then the segment label.

    A label matches by name when the segment label equals (ignoring case, spaces, dashes
    and underscores) the label's name, its key, its type code's meaning or one of its
    ``aliases``. Two segments may map to one label (their union is taken).

    Returns
    -------
    tuple[dict[int, Label], list[str]]
        Segment number → label, and the descriptions of segments that map to nothing.
    """
    by_code = {(label.type_code.value, label.type_code.scheme_designator): label
               for label in labels}
    by_name: dict[str, Label] = {}
    for label in labels:
        names = [label.name, label.key, label.type_code.meaning, *aliases.get(label.key, ())]
        for name in names:
            by_name.setdefault(_normalized(name), label)
    mapping: dict[int, Label] = {}
    unmapped: list[str] = []
    for segment in segments:
        label = by_code.get(segment.type_code[:2]) or by_name.get(_normalized(segment.label))
        if label is None:
            unmapped.append(segment.describe())
        else:
            mapping[segment.number] = label
    return mapping, unmapped


def source_frames_of(seg: Dataset) -> tuple[SourceFrame, ...]:
    """The source frames a SEG references, in the order it lists them.

    From the Referenced Series Sequence, then per-frame Source Image references; each
    frame's position is the SEG's plane position of the first frame referencing it.
    """
    found: dict[tuple[str, int], tuple[float, float, float] | None] = {}
    for series in seg.get("ReferencedSeriesSequence", []):
        for item in series.get("ReferencedInstanceSequence", []):
            if "ReferencedSOPInstanceUID" in item:
                found.setdefault((str(item.ReferencedSOPInstanceUID), 1), None)
    for group in seg.get("PerFrameFunctionalGroupsSequence", []):
        position = _plane_position(group)
        for key in _frame_references(group):
            if found.get(key) is None:
                found[key] = position
    return tuple(SourceFrame(uid, number, position) for (uid, number), position in found.items())


def referenced_uids(seg: Dataset) -> tuple[set[str], set[str]]:
    """Series and SOP Instance UIDs of the source images a SEG names, wherever it names them.

    The Referenced Series Sequence, and the Source Image references of the per-frame and
    the shared functional groups.
    """
    series_uids = {str(series.SeriesInstanceUID)
                   for series in seg.get("ReferencedSeriesSequence", [])
                   if series.get("SeriesInstanceUID")}
    sop_uids = {frame.sop_instance_uid for frame in source_frames_of(seg)}
    for group in seg.get("SharedFunctionalGroupsSequence", []):
        sop_uids.update(uid for uid, _ in _frame_references(group))
    return series_uids, sop_uids


def _check_is_seg(seg: Dataset) -> None:
    if seg.get("SOPClassUID") != SegmentationStorage:
        raise SegmentationError(f"not a Segmentation Storage instance (SOP Class "
                                f"{seg.get('SOPClassUID', 'missing')})")
    kind = str(seg.get("SegmentationType", ""))
    if kind not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise SegmentationError(f"Segmentation Type {kind or 'missing'!r} is not BINARY, "
                                "FRACTIONAL or LABELMAP")
    if "PixelData" not in seg:
        raise SegmentationError("the SEG has no pixel data")


def _frame_masks(seg: Dataset) -> np.ndarray:
    """The SEG's frames as ``(frames, rows, cols)``: 0/1 masks, or segment numbers."""
    try:
        rows, cols = int(seg.Rows), int(seg.Columns)
        count = int(seg.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise SegmentationError(f"the SEG's image size is unreadable: {exc}") from exc
    if not (0 < rows <= MAX_MATRIX and 0 < cols <= MAX_MATRIX):
        raise SegmentationError(f"frames of {rows}x{cols} pixels (at most {MAX_MATRIX} a side)")
    if not 0 < count * rows * cols <= MAX_IMAGE_VOXELS:
        raise SegmentationError(f"{count} frames of {rows}x{cols} is too large to decode")
    _check_native_length(seg, count * rows * cols)
    try:
        pixels = np.asarray(seg.pixel_array)
    except Exception as exc:  # pydicom's decoders raise anything from ValueError to struct.error
        raise SegmentationError(
            f"pixel data cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.shape != (count, rows, cols):
        raise SegmentationError(f"pixel data holds {pixels.shape}, the header declares "
                                f"{count} frames of {rows}x{cols}")
    if str(seg.SegmentationType) == "FRACTIONAL":
        maximum = int(seg.get("MaximumFractionalValue", 255) or 255)
        if int(pixels.max(initial=0)) <= 1:
            # dcmjs' legacy adapter (OHIF v2) declares a maximum of 255 but stores 1 for
            # every pixel of the segment: a mask, not a probability of 1/255.
            return (pixels > 0).astype(np.uint8)
        return (pixels.astype(np.int32) * 2 > maximum).astype(np.uint8)
    return pixels


def _check_native_length(seg: Dataset, pixels: int) -> None:
    """Refuse uncompressed pixel data longer or shorter than the header says.

    Only the even padding may follow. pydicom takes excess bytes for padding and decodes
    the rest shifted: dcmjs 0.47.1-0.49.0 (OHIF 3.12) wrapped native pixel data in an item
    tag, which would give masks moved by eight bytes, silently.
    """
    syntax = getattr(getattr(seg, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_encapsulated:
        return
    bits = int(seg.get("BitsAllocated", 1) or 1)
    expected = (pixels * bits + 7) // 8
    actual = len(seg.PixelData)
    if actual not in (expected, expected + expected % 2):
        raise SegmentationError(f"pixel data holds {actual} bytes, the header declares "
                                f"{expected}: the file is malformed")


def _segment_numbers(seg: Dataset, groups: Sequence[Dataset]) -> list[int] | None:
    """Segment number of each frame; None for a LABELMAP SEG (values are the numbers)."""
    if str(seg.SegmentationType) == "LABELMAP":
        return None
    shared = _shared(seg)
    numbers = []
    for index, group in enumerate(groups, start=1):
        identification = (group.get("SegmentIdentificationSequence")
                          or shared.get("SegmentIdentificationSequence"))
        try:
            numbers.append(int(identification[0].ReferencedSegmentNumber))
        except (AttributeError, IndexError, TypeError, ValueError):
            raise SegmentationError(f"frame {index} names no segment") from None
    return numbers


def _place_frames(seg: Dataset, frames: Sequence[SourceFrame], groups: Sequence[Dataset]
                  ) -> list[int | None]:
    """Index into ``frames`` of each SEG frame: by reference, else by plane position.

    A frame that lies on no source frame is an error unless it is one the writer left
    empty; a frame whose reference and position disagree (a SEG drawn on another grid)
    is an error too.
    """
    geometry = _Geometry.of(seg, frames)
    by_key = {(frame.sop_instance_uid, frame.frame_number): index
              for index, frame in enumerate(frames)}
    placement: list[int | None] = []
    unplaced: list[int] = []
    for number, group in enumerate(groups, start=1):
        position = _plane_position(group)
        by_reference = next((by_key[key] for key in _frame_references(group) if key in by_key),
                            None)
        by_position = geometry.nearest(position)
        if by_reference is not None and position is not None and geometry.known(by_reference) \
                and by_position != by_reference:
            raise SegmentationError(
                f"frame {number} references source frame {by_reference + 1} but lies at "
                f"{_mm(position)}, which is not that frame's position: the SEG's frames do "
                "not match the source geometry")
        target = by_reference if by_reference is not None else by_position
        if target is None:
            unplaced.append(number)
        placement.append(target)
    if unplaced:
        raise SegmentationError(
            f"{len(unplaced)} of {len(groups)} frames (first: frame {unplaced[0]}) lie on none of "
            f"the {len(frames)} source images: the SEG references images this node does not "
            "hold or frames that do not match the source geometry")
    return placement


@dataclass(frozen=True)
class _Geometry:
    """Where the source frames lie, to place SEG frames by their plane position."""

    positions: np.ndarray | None
    """``(frames, 3)``, or None when some source frame's position is unknown."""
    tolerance_mm: float

    @classmethod
    def of(cls, seg: Dataset, frames: Sequence[SourceFrame]) -> _Geometry:
        if any(frame.position is None for frame in frames):
            return cls(None, 0.0)
        positions = np.array([frame.position for frame in frames], dtype=float)
        spacing = _pixel_spacing(seg)
        gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1) if len(frames) > 1 else []
        nearest_slice = float(np.min(gaps)) if len(gaps) and np.min(gaps) > 0 else 1.0
        in_plane = min(spacing) if spacing else 1.0
        # Half a pixel in the plane, a quarter of the slice gap across it: a SEG frame
        # further away than that is on another grid, not a rounding of ours.
        return cls(positions, max(1e-3, min(0.5 * in_plane, 0.25 * nearest_slice)))

    def known(self, index: int) -> bool:
        return self.positions is not None and 0 <= index < len(self.positions)

    def nearest(self, position: tuple[float, float, float] | None) -> int | None:
        if position is None or self.positions is None or not len(self.positions):
            return None
        distances = np.linalg.norm(self.positions - np.asarray(position), axis=1)
        index = int(np.argmin(distances))
        return index if distances[index] <= self.tolerance_mm else None


def _shared(seg: Dataset) -> Dataset:
    shared = seg.get("SharedFunctionalGroupsSequence")
    return shared[0] if shared else Dataset()


def _pixel_spacing(seg: Dataset) -> tuple[float, float] | None:
    for group in (_shared(seg), *seg.get("PerFrameFunctionalGroupsSequence", [])[:1]):
        measures = group.get("PixelMeasuresSequence")
        if measures and "PixelSpacing" in measures[0]:
            try:
                return float(measures[0].PixelSpacing[0]), float(measures[0].PixelSpacing[1])
            except (TypeError, ValueError, IndexError):
                return None
    return None


def image_position(item: Dataset) -> tuple[float, float, float] | None:
    """Image Position (Patient) of an image or a Plane Position item, if it has a valid one."""
    try:
        x, y, z = (float(value) for value in item.ImagePositionPatient)
    except (AttributeError, TypeError, ValueError):
        return None
    return (x, y, z)


def _plane_position(group: Dataset) -> tuple[float, float, float] | None:
    planes = group.get("PlanePositionSequence")
    return image_position(planes[0]) if planes else None


def _frame_references(group: Dataset) -> list[tuple[str, int]]:
    """(SOP Instance UID, frame number) of each source image a per-frame group names."""
    found = []
    for derivation in group.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            uid = source.get("ReferencedSOPInstanceUID")
            if not uid:
                continue
            numbers = source.get("ReferencedFrameNumber")
            if numbers in (None, ""):
                numbers = [1]
            elif not isinstance(numbers, MultiValue | list | tuple):
                numbers = [numbers]
            try:
                found.extend((str(uid), int(number)) for number in numbers)
            except (TypeError, ValueError):
                continue
    return found


def _code(item: Dataset, keyword: str) -> tuple[str, str, str]:
    codes = item.get(keyword)
    if not codes:
        return ("", "", "")
    code = codes[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or ""
    return (str(value), str(code.get("CodingSchemeDesignator", "")),
            str(code.get("CodeMeaning", "")))


def _normalized(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().casefold()


def _mm(position: tuple[float, float, float]) -> str:
    return "(" + ", ".join(f"{value:.1f}" for value in position) + ") mm"
