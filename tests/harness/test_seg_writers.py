"""The SEG writers of tests/harness/writers.py write what they are asked, as the real tools do.

Each writer runs for real on a small phantom; the SEG it wrote is read back with pydicom
(frame by frame through its per-frame source references, independently of any SEG
library), and where they can read it with highdicom and dcmqi. The quirks each real
writer has are asserted too, so that a version bump that changes them shows up here and
in the recogniser's tests rather than at a hospital.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SegmentationStorage

from tests.conftest import WrittenStudy, write_phantom
from tests.harness.writers import (
    SegmentSpec,
    dcmqi_tool,
    leg_segments,
    node_writers_missing,
    ohif_segments,
    write_cornerstone,
    write_dcmjs,
    write_dcmqi,
    write_highdicom,
)

TIBIA = SegmentSpec(value=7, label="Tibia",
                    type_code=("12611008", "SCT", "Bone structure of tibia"))
"""A structure the model does not know: a reader must keep or skip it, not fail."""

NEEDS_NODE = pytest.mark.skipif(node_writers_missing() is not None,
                                reason=str(node_writers_missing()))

Writer = Callable[..., Path]

SERIES_UID = hd.UID()
"""The series a correction is saved into, by the writers that can do that."""


@dataclass(frozen=True)
class Case:
    """A writer and the options it runs with."""

    name: str
    write: Writer
    options: dict[str, object]
    marks: tuple[pytest.MarkDecorator, ...] = ()

    def param(self) -> object:
        return pytest.param(self, id=self.name, marks=self.marks)


CASES = (
    Case("highdicom", write_highdicom, {}),
    Case("highdicom-fractional-per-frame", write_highdicom,
         {"fractional": True, "geometry_per_frame_only": True, "omit_empty_frames": False}),
    Case("dcmqi", write_dcmqi, {}),
    Case("dcmjs", write_dcmjs, {}, (NEEDS_NODE,)),
    Case("dcmjs-binary", write_dcmjs, {"rle_encode": False}, (NEEDS_NODE,)),
    Case("cornerstone", write_cornerstone, {}, (NEEDS_NODE,)),
)
SAVES_INTO_SERIES = {"highdicom", "dcmjs", "cornerstone"}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> WrittenStudy:
    return write_phantom(tmp_path_factory.mktemp("phantom"), site="C", seed=1, slices=12,
                         matrix=128)


@pytest.fixture(scope="module")
def sources(study: WrittenStudy) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in study.files.images]


@pytest.fixture(scope="module")
def corrected(study: WrittenStudy) -> tuple[np.ndarray, list[SegmentSpec]]:
    """A radiologist's correction: three muscles deleted, a tibia drawn, segments reordered.

    Tibia comes first as segment 1 and the kept muscles follow in another order and with
    other numbers than the model wrote them.
    """
    labels = study.study.labels.copy()
    labels[np.isin(labels, (2, 3, 5))] = 0
    square = np.zeros_like(labels, dtype=bool)
    square[3:9, 60:70, 60:70] = True
    labels[square & (labels == 0)] = TIBIA.value
    by_value = {spec.value: spec for spec in leg_segments()}
    segments = [replace(TIBIA, number=1), replace(by_value[6], number=2),
                replace(by_value[1], number=3), replace(by_value[4], number=4)]
    return labels, segments


@pytest.fixture(scope="module")
def written(study: WrittenStudy, corrected: tuple[np.ndarray, list[SegmentSpec]],
            tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case, str], Path]:
    """Write (once per module) the full truth or the correction with a writer."""
    folder = tmp_path_factory.mktemp("segs")
    cache: dict[tuple[str, str], Path] = {}

    def write(case: Case, scenario: str) -> Path:
        if (case.name, scenario) not in cache:
            out = folder / f"{case.name}-{scenario}.dcm"
            if scenario == "truth":
                case.write(study.files.images, study.study.labels, leg_segments(), out,
                           **case.options)
            else:
                labels, segments = corrected
                options = dict(case.options)
                if case.write is not write_dcmqi:
                    options["series_instance_uid"] = SERIES_UID
                case.write(study.files.images, labels, segments, out, **options)
            cache[case.name, scenario] = out
        return cache[case.name, scenario]

    return write


def masks_by_reference(seg: pydicom.Dataset, uids: list[str]) -> dict[int, np.ndarray]:
    """Each segment's mask over ``uids``, placed by each frame's Source Image reference.

    Plain pydicom, so that a writer is not judged by the library that reads it; a
    FRACTIONAL frame counts any non-zero pixel (dcmjs stores 1 of 255).
    """
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    index = {uid: i for i, uid in enumerate(uids)}
    masks = {int(item.SegmentNumber): np.zeros((len(uids), seg.Rows, seg.Columns), bool)
             for item in seg.SegmentSequence}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        masks[number][index[source.ReferencedSOPInstanceUID]] |= frame > 0
    return masks


def expected_masks(seg: pydicom.Dataset, labels: np.ndarray,
                   segments: list[SegmentSpec]) -> dict[int, np.ndarray]:
    """What each written segment must hold, found through its Segment Label."""
    by_label = {spec.label: spec for spec in segments}
    return {int(item.SegmentNumber): labels == by_label[item.SegmentLabel].value
            for item in seg.SegmentSequence}


def assert_masks_equal(found: dict[int, np.ndarray], expected: dict[int, np.ndarray]) -> None:
    assert found.keys() == expected.keys()
    for number, mask in expected.items():
        assert np.array_equal(found[number], mask), f"segment {number} differs"


@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_seg_references_sources_and_holds_the_label_map(
    case: Case, written: Callable[[Case, str], Path], study: WrittenStudy,
    sources: list[pydicom.Dataset],
) -> None:
    seg = pydicom.dcmread(written(case, "truth"))
    uids = [ds.SOPInstanceUID for ds in sources]

    assert seg.SOPClassUID == SegmentationStorage
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence}
    assert referenced == set(uids)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == [
        spec.label for spec in leg_segments()]
    assert {item.SegmentAlgorithmType for item in seg.SegmentSequence} == {"MANUAL"}
    if seg.BitsAllocated == 1:
        # dcmjs 0.47.1-0.49.0 (OHIF 3.12 ships 0.48.0) wrapped native Pixel Data in item
        # tags; the pinned 0.49.4 must write it plain, padded to an even length only.
        packed = -(-int(seg.NumberOfFrames) * seg.Rows * seg.Columns // 8)
        assert len(seg.PixelData) == packed + packed % 2
    assert_masks_equal(masks_by_reference(seg, uids),
                       expected_masks(seg, study.study.labels, leg_segments()))

    if case.options.get("geometry_per_frame_only"):
        assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
        assert all("PixelMeasuresSequence" in item and "PlaneOrientationSequence" in item
                   for item in seg.PerFrameFunctionalGroupsSequence)

    # Every frame also sits where its source does: readers may place frames by position.
    positions = {ds.SOPInstanceUID: np.array(ds.ImagePositionPatient, float) for ds in sources}
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        position = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.allclose(position, positions[source.ReferencedSOPInstanceUID], atol=1e-3)


@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_correction_is_written_as_asked(
    case: Case, written: Callable[[Case, str], Path], sources: list[pydicom.Dataset],
    corrected: tuple[np.ndarray, list[SegmentSpec]],
) -> None:
    labels, segments = corrected
    seg = pydicom.dcmread(written(case, "corrected"))

    expected = ohif_segments(segments) if case.write is write_cornerstone else segments
    assert [(int(item.SegmentNumber), item.SegmentLabel,
             item.SegmentedPropertyTypeCodeSequence[0].CodeValue,
             item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
             item.SegmentedPropertyCategoryCodeSequence[0].CodeValue)
            for item in seg.SegmentSequence] == [
        (spec.number, spec.label, spec.type_code[0], spec.type_code[1], spec.category_code[0])
        for spec in expected]
    assert_masks_equal(masks_by_reference(seg, [ds.SOPInstanceUID for ds in sources]),
                       expected_masks(seg, labels, segments))
    if case.name in SAVES_INTO_SERIES:
        assert seg.SeriesInstanceUID == SERIES_UID


@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_highdicom_reads_what_the_writer_wrote(
    case: Case, written: Callable[[Case, str], Path], study: WrittenStudy,
    sources: list[pydicom.Dataset],
) -> None:
    dataset = pydicom.dcmread(written(case, "truth"))
    if case.write is write_cornerstone:
        # @cornerstonejs/adapters 4.x empties the shared Pixel Measures Sequence (no Pixel
        # Spacing, no Slice Thickness); highdicom refuses such a SEG.
        assert len(dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]) == 0
        with pytest.raises(AttributeError, match="Pixel Measures"):
            hd.seg.Segmentation.from_dataset(dataset)
        return
    seg = hd.seg.Segmentation.from_dataset(dataset)
    uids = [ds.SOPInstanceUID for ds in sources]
    if case.write is not write_highdicom:
        # No writer but highdicom says Spatial Locations Preserved, so highdicom must be
        # told to index by source instance anyway.
        with pytest.raises(RuntimeError, match="spatial locations"):
            seg.get_pixels_by_source_instance(uids)
    pixels = seg.get_pixels_by_source_instance(uids, ignore_spatial_locations=True,
                                               rescale_fractional=False)
    labels = np.zeros(study.study.labels.shape, np.uint8)
    for position, number in enumerate(seg.get_segment_numbers()):
        labels[pixels[..., position] > 0] = number
    assert np.array_equal(labels, study.study.labels)


@pytest.mark.parametrize("name", ["highdicom", "dcmqi"])
def test_dcmqi_reads_back_the_label_map(
    name: str, written: Callable[[Case, str], Path], study: WrittenStudy,
    sources: list[pydicom.Dataset], tmp_path: Path,
) -> None:
    (case,) = (case for case in CASES if case.name == name)
    subprocess.run([
        dcmqi_tool("segimage2itkimage"),
        "--inputDICOM", str(written(case, "truth")), "--outputDirectory", str(tmp_path),
        "--mergeSegments", "-t", "nrrd",
    ], check=True, capture_output=True, timeout=60)
    image = sitk.ReadImage(str(tmp_path / "1.nrrd"))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert [s["SegmentLabel"] for group in meta["segmentAttributes"] for s in group] == [
        spec.label for spec in leg_segments()]
    # dcmqi's volume runs along the slice normal: put the sources in that order.
    by_z = np.argsort([float(ds.ImagePositionPatient[2]) for ds in sources])
    assert np.allclose(image.GetOrigin(), sources[by_z[0]].ImagePositionPatient, atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(image), study.study.labels[by_z])


@NEEDS_NODE
def test_dcmjs_legacy_writes_fractional_rle_with_ones_of_255(
    written: Callable[[Case, str], Path],
) -> None:
    (case,) = (case for case in CASES if case.name == "dcmjs")
    seg = pydicom.dcmread(written(case, "truth"))
    assert seg.file_meta.TransferSyntaxUID == RLELossless
    assert (seg.SegmentationType, seg.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    assert (seg.MaximumFractionalValue, seg.BitsAllocated) == (255, 8)
    assert set(np.unique(seg.pixel_array).tolist()) == {0, 1}
    # Frames run by segment, then from the highest slice to the lowest along the normal.
    heights = [float(item.PlanePositionSequence[0].ImagePositionPatient[2])
               for item in seg.PerFrameFunctionalGroupsSequence[:12]]
    assert heights == sorted(heights, reverse=True)


@NEEDS_NODE
def test_dcmjs_binary_is_bit_packed_explicit_little_endian(
    written: Callable[[Case, str], Path],
) -> None:
    (case,) = (case for case in CASES if case.name == "dcmjs-binary")
    seg = pydicom.dcmread(written(case, "truth"))
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (seg.SegmentationType, seg.BitsAllocated) == ("BINARY", 1)


@pytest.mark.parametrize("write", [
    write_dcmqi, pytest.param(write_dcmjs, marks=NEEDS_NODE),
], ids=["dcmqi", "dcmjs"])
def test_gaps_in_segment_numbers_are_closed_up(
    write: Writer, study: WrittenStudy, tmp_path: Path,
) -> None:
    soleus, peroneus = (replace(spec, number=number) for spec, number in
                        ((leg_segments()[0], 5), (leg_segments()[5], 2)))
    labels = np.where(np.isin(study.study.labels, (1, 6)), study.study.labels, 0)
    seg = pydicom.dcmread(write(study.files.images, labels, [soleus, peroneus],
                                tmp_path / "seg.dcm"))
    assert [(int(item.SegmentNumber), item.SegmentLabel) for item in seg.SegmentSequence] == [
        (1, "Peroneus"), (2, "Soleus")]


def test_highdicom_refuses_gaps_in_segment_numbers(study: WrittenStudy, tmp_path: Path) -> None:
    soleus = replace(leg_segments()[0], number=2)
    labels = np.where(study.study.labels == 1, 1, 0)
    with pytest.raises(ValueError, match="numbered starting from 1"):
        write_highdicom(study.files.images, labels, [soleus], tmp_path / "seg.dcm")


def test_highdicom_keeps_empty_frames_when_asked(study: WrittenStudy, tmp_path: Path) -> None:
    labels = np.where(study.study.labels == 1, 1, 0)
    labels[:6] = 0
    soleus = leg_segments()[:1]
    kept = pydicom.dcmread(write_highdicom(study.files.images, labels, soleus,
                                           tmp_path / "kept.dcm", omit_empty_frames=False))
    omitted = pydicom.dcmread(write_highdicom(study.files.images, labels, soleus,
                                              tmp_path / "omitted.dcm"))
    assert (kept.NumberOfFrames, omitted.NumberOfFrames) == (12, 6)


def test_label_values_without_a_segment_are_refused(study: WrittenStudy, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"values \[2, 3, 4, 5, 6\]"):
        write_dcmqi(study.files.images, study.study.labels, leg_segments()[:1],
                    tmp_path / "seg.dcm")


def test_ohif_segments_keep_only_the_label() -> None:
    recoded = ohif_segments(leg_segments())
    assert [spec.label for spec in recoded] == [spec.label for spec in leg_segments()]
    assert {(spec.type_code, spec.category_code) for spec in recoded} == {
        (("T-D0050", "SRT", "Tissue"), ("T-D0050", "SRT", "Tissue"))}
