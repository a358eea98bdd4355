"""Read DICOM files into image series the model can segment.

Input comes from PACS exports, CDs and the node's spool, so it is messy: mixed
series, non-image objects, compressed or big-endian transfer syntaxes, broken
files. This module sorts files into series, says in one line per file why a file
cannot be used, and turns a usable series into a volume with its geometry. A
series with any unusable image is refused as a whole: a SEG over part of a
series would look complete to a radiologist and is worse than none. Every
image's header is checked (:mod:`dafne_node.dicom.pixels`), and the series' size, before
the first image is decoded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, EnhancedMRImageStorage, MRImageStorage

from dafne_node.dicom.pixels import (
    MAX_IMAGE_VOXELS,
    PixelDataError,
    PixelLayout,
    decode,
    one_line,
    read_layout,
)

LOGGER = logging.getLogger(__name__)

MAX_SERIES_VOXELS = MAX_IMAGE_VOXELS
"""Most voxels in one series: as many single-frame images as one multi-frame image may
hold (1 GiB as float32, e.g. 1024 slices of 512x512)."""

IMAGE_SOP_CLASSES: dict[str, str] = {
    MRImageStorage: "MR",
    EnhancedMRImageStorage: "MR",
}
"""SOP classes the models read, with the modality each belongs to."""

MULTIFRAME_SOP_CLASSES = frozenset({EnhancedMRImageStorage})
"""Those of :data:`IMAGE_SOP_CLASSES` whose images hold several frames."""


class InputError(ValueError):
    """A file or series that cannot be segmented; the message says which and why."""


@dataclass(frozen=True)
class Refusal:
    """One file or series left out, with the reason, for the user to read."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class SeriesFiles:
    """The DICOM files of one series, headers read, pixel data not yet decoded."""

    series_instance_uid: str
    datasets: tuple[Dataset, ...]
    paths: tuple[Path, ...]

    @property
    def first(self) -> Dataset:
        """The first dataset, for series-level attributes."""
        return self.datasets[0]

    @property
    def sop_class_uid(self) -> UID:
        """SOP Class of the series' first instance."""
        return UID(self.first.SOPClassUID)

    @property
    def frame_count(self) -> int:
        """Number of image frames over all instances."""
        return sum(int(getattr(ds, "NumberOfFrames", 1) or 1) for ds in self.datasets)

    @property
    def description(self) -> str:
        """A line naming the series for people: number, description, modality, size."""
        ds = self.first
        return (
            f"series {ds.get('SeriesNumber', '?')} "
            f"'{ds.get('SeriesDescription', '')}' ({ds.get('Modality', '?')}, "
            f"{self.frame_count} images)"
        )


@dataclass(frozen=True)
class ImageVolume:
    """A series' pixels with the geometry needed to segment and to measure.

    Attributes
    ----------
    pixels:
        ``(frames, rows, cols)`` float32 with the modality rescale applied.
        Frames follow ``sources``: single-frame images sorted along the slice
        normal, or the frames of one multi-frame image in file order.
    pixel_spacing:
        ``(row spacing, column spacing)`` in mm, DICOM PixelSpacing order.
    slice_spacing:
        Distance between adjacent slices in mm, for volumes in mL.
    sources:
        The source datasets in frame order, pixel data removed.
    """

    pixels: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    sources: tuple[Dataset, ...]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing / 1000.0


def find_files(inputs: Iterable[Path]) -> list[Path]:
    """Expand folders recursively into the files they hold, sorted, hidden files skipped.

    Raises
    ------
    InputError
        If an input does not exist.
    """
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files.extend(
                p for p in sorted(path.rglob("*"))
                if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR"
            )
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return files


def read_series(files: Iterable[Path]) -> tuple[list[SeriesFiles], list[Refusal]]:
    """Group DICOM files by series, reading headers only.

    Returns the series found and a refusal for every file that is not DICOM,
    cannot be parsed or repeats an instance already seen.
    """
    grouped: dict[str, list[tuple[Path, Dataset]]] = {}
    seen_instances: set[str] = set()
    refusals: list[Refusal] = []
    for path in files:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dataset = dcmread(path, defer_size="4 KB")
        except InvalidDicomError:
            refusals.append(Refusal(path, "not a DICOM file (no DICOM preamble or file meta)"))
            continue
        except Exception as exc:  # any parse failure is the file's fault
            refusals.append(Refusal(path, f"unreadable DICOM ({type(exc).__name__}: "
                                          f"{one_line(exc)})"))
            continue
        series_uid = dataset.get("SeriesInstanceUID")
        sop_uid = dataset.get("SOPInstanceUID")
        if not series_uid or not sop_uid or "SOPClassUID" not in dataset:
            refusals.append(Refusal(path, _why_no_uids(caught)))
            continue
        if sop_uid in seen_instances:
            refusals.append(Refusal(path, f"duplicate of instance {sop_uid} already read"))
            continue
        seen_instances.add(sop_uid)
        grouped.setdefault(str(series_uid), []).append((path, dataset))
    series = [
        SeriesFiles(uid, tuple(ds for _, ds in members), tuple(p for p, _ in members))
        for uid, members in grouped.items()
    ]
    return series, refusals


def _why_no_uids(caught: Sequence[warnings.WarningMessage]) -> str:
    # pydicom returns an empty data set, with only a warning, for a file that ends
    # inside an element of undefined length (compressed pixel data cut short).
    for warning in caught:
        if str(warning.message).startswith("End of file reached"):
            return ("truncated: the file ends inside an element of undefined length "
                    "(encapsulated Pixel Data or a sequence), so no data set could be read")
    return "missing SOP Class, SOP Instance or Series Instance UID"


def why_not_segmentable(series: SeriesFiles, modality: str) -> str | None:
    """Return why a model for ``modality`` cannot read this series, or None if it can."""
    sop_class = series.sop_class_uid
    if IMAGE_SOP_CLASSES.get(sop_class) != modality:
        name = sop_class.name if sop_class.is_valid else str(sop_class)
        return f"{name} is not a {modality} image series this model segments"
    for path, ds in zip(series.paths, series.datasets, strict=True):
        if ds.SOPClassUID != sop_class:
            return f"{path}: mixes SOP classes within the series"
        if "PixelData" not in ds:
            return f"{path}: has no pixel data"
        if ds.get("SamplesPerPixel", 1) != 1:
            return f"{path}: colour images ({ds.get('PhotometricInterpretation')}) are not MR"
    return None


def load_volume(series: SeriesFiles) -> ImageVolume:
    """Decode every image of ``series`` into one volume with its geometry.

    Raises
    ------
    InputError
        Naming the first file whose pixels cannot be decoded or whose geometry
        does not fit the rest of the series, or saying that the series is larger
        than :data:`MAX_SERIES_VOXELS`. Headers are checked before anything is
        decoded.
    """
    layouts = [_layout(path, ds) for path, ds in zip(series.paths, series.datasets, strict=True)]
    voxels = sum(layout.voxels for layout in layouts)
    if voxels > MAX_SERIES_VOXELS:
        raise InputError(f"{series.paths[0]}: {series.description} has {voxels:,} voxels; the "
                         f"node segments at most {MAX_SERIES_VOXELS:,} in a series")
    if series.first.SOPClassUID == EnhancedMRImageStorage:
        if len(series.datasets) != 1:
            raise InputError(
                f"{series.paths[1]}: more than one enhanced multi-frame image in one series"
            )
        return _load_multiframe(series.paths[0], series.datasets[0], layouts[0])
    return _load_single_frames(series, layouts)


def _load_single_frames(series: SeriesFiles, layouts: Sequence[PixelLayout]) -> ImageVolume:
    first = series.first
    orientation = _orientation(series.paths[0], first)
    normal = np.cross(orientation[:3], orientation[3:])
    keyed: list[tuple[float, Path, Dataset, PixelLayout]] = []
    for path, ds, layout in zip(series.paths, series.datasets, layouts, strict=True):
        _check_same_grid(path, ds, first, orientation)
        keyed.append((float(np.dot(_position(path, ds), normal)), path, ds, layout))
    keyed.sort(key=lambda item: item[0])
    positions = np.array([item[0] for item in keyed])
    if len(positions) > 1 and np.min(np.diff(positions)) < 1e-3:
        index = int(np.argmin(np.diff(positions))) + 1
        raise InputError(f"{keyed[index][1]}: two images at the same slice position")
    pixels = np.empty((len(keyed), layouts[0].rows, layouts[0].columns), dtype=np.float32)
    for index, (_, path, ds, layout) in enumerate(keyed):
        pixels[index] = _decode(path, ds, layout)
    return ImageVolume(
        pixels=pixels,
        pixel_spacing=_pixel_spacing(series.paths[0], first),
        slice_spacing=_slice_spacing(positions, first),
        sources=tuple(_without_pixels(item[2]) for item in keyed),
    )


def _load_multiframe(path: Path, ds: Dataset, layout: PixelLayout) -> ImageVolume:
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    try:
        measures = shared.PixelMeasuresSequence[0]
        orientation = np.array(
            shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float
        )
        positions_xyz = [
            np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
            for item in per_frame
        ]
    except (AttributeError, IndexError) as exc:
        raise InputError(f"{path}: multi-frame image lacks plane geometry ({exc})") from exc
    if len(positions_xyz) != layout.frames:
        raise InputError(f"{_where(path, ds)}: {len(positions_xyz)} per-frame positions for "
                         f"{layout.frames} frames")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.sort([float(np.dot(p, normal)) for p in positions_xyz])
    pixels = _decode(path, ds, layout)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    spacing = (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1]))
    thickness = float(measures.get("SliceThickness", 0) or 0)
    return ImageVolume(
        pixels=pixels,
        pixel_spacing=spacing,
        slice_spacing=_slice_spacing(positions, Dataset(), fallback=thickness),
        sources=(_without_pixels(ds),),
    )


def _where(path: Path, ds: Dataset) -> str:
    """The file and, for people at the scanner console, its instance number."""
    number = ds.get("InstanceNumber")
    return f"{path} (instance {number})" if number not in (None, "") else str(path)


def _layout(path: Path, ds: Dataset) -> PixelLayout:
    try:
        return read_layout(ds, multiframe=ds.SOPClassUID in MULTIFRAME_SOP_CLASSES)
    except PixelDataError as exc:
        raise InputError(f"{_where(path, ds)}: {exc}") from exc


def _decode(path: Path, ds: Dataset, layout: PixelLayout) -> np.ndarray:
    try:
        array = decode(ds, layout).astype(np.float32)
    except PixelDataError as exc:
        raise InputError(f"{_where(path, ds)}: {exc}") from exc
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        array = array * slope + intercept
    return array


def _orientation(path: Path, ds: Dataset) -> np.ndarray:
    if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
        raise InputError(f"{path}: no Image Orientation/Position (Patient); geometry unknown")
    return np.array(ds.ImageOrientationPatient, dtype=float)


def _position(path: Path, ds: Dataset) -> np.ndarray:
    if "ImagePositionPatient" not in ds:
        raise InputError(f"{path}: no Image Position (Patient)")
    return np.array(ds.ImagePositionPatient, dtype=float)


def _pixel_spacing(path: Path, ds: Dataset) -> tuple[float, float]:
    if "PixelSpacing" not in ds:
        raise InputError(f"{path}: no Pixel Spacing; the model needs the voxel size")
    return float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])


def _check_same_grid(path: Path, ds: Dataset, first: Dataset, orientation: np.ndarray) -> None:
    if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
        raise InputError(
            f"{path}: {ds.Rows}x{ds.Columns} image in a {first.Rows}x{first.Columns} series"
        )
    if not np.allclose(_orientation(path, ds), orientation, atol=1e-4):
        raise InputError(f"{path}: orientation differs from the rest of the series")
    if not np.allclose(_pixel_spacing(path, ds), _pixel_spacing(path, first), atol=1e-4):
        raise InputError(f"{path}: pixel spacing differs from the rest of the series")


def _slice_spacing(positions: np.ndarray, ds: Dataset, fallback: float | None = None) -> float:
    if len(positions) > 1:
        return float(np.median(np.diff(positions)))
    thickness = fallback or float(ds.get("SpacingBetweenSlices", 0) or 0) or float(
        ds.get("SliceThickness", 0) or 0
    )
    return thickness or 1.0


def _without_pixels(ds: Dataset) -> Dataset:
    """Keep headers only: sources are referenced by the SEG, never re-encoded."""
    copy = Dataset(ds)
    copy.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in copy:
            del copy[keyword]
    return copy


def choose_series(
    series: Sequence[SeriesFiles], modality: str, series_uid: str | None = None
) -> tuple[SeriesFiles | None, list[str]]:
    """Pick the series to segment: the requested one, else the largest usable.

    Returns the chosen series (None if none fits) and one reason per series
    that was not chosen, for the user.
    """
    notes: list[str] = []
    usable: list[SeriesFiles] = []
    for item in series:
        if series_uid is not None and item.series_instance_uid != series_uid:
            continue
        reason = why_not_segmentable(item, modality)
        if reason is None:
            usable.append(item)
        else:
            notes.append(f"{item.paths[0]}: {reason}")
    if series_uid is not None and not usable and not notes:
        notes.append(f"no series with Series Instance UID {series_uid} in the input")
    if not usable:
        return None, notes
    usable.sort(key=lambda item: item.frame_count, reverse=True)
    for other in usable[1:]:
        notes.append(f"{other.paths[0]}: {other.description} not used; the largest series was")
    return usable[0], notes
