"""Our DICOM-SEG is valid DICOM and reads the same in highdicom, dcmqi (3D Slicer) and us."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import Dataset, dcmread
from pydicom.uid import SegmentationStorage

from dafne_node.dicom.seg_decode import SegmentationError, SourceFrame, decode_segmentation
from dafne_node.dicom.seg_encode import SegmentationAlgorithm, encode_segmentation
from dafne_node.model.labels import LEG_MUSCLES
from tests.conftest import WrittenStudy

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def dcmqi_tool(name: str) -> str:
    path = VENV_BIN / name
    return str(path) if path.exists() else name


def source_headers(study: WrittenStudy) -> list[Dataset]:
    return [dcmread(path, stop_before_pixels=True) for path in study.files.images]


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True,
                            check=False, timeout=60)
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if line.startswith("Error")]


def label_map_from_dcmqi(folder: Path, sources: list[Dataset]) -> np.ndarray:
    """Put dcmqi's per-segment NRRD volumes back on the source grid via patient coordinates."""
    meta = json.loads((folder / "meta.json").read_text())
    code_to_value = {label.type_code.value: label.value for label in LEG_MUSCLES}
    first = sources[0]
    row_dir = np.array(first.ImageOrientationPatient[:3], dtype=float)
    col_dir = np.array(first.ImageOrientationPatient[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    origins = np.array([ds.ImagePositionPatient for ds in sources], dtype=float)
    slice_keys = origins @ normal
    result = np.zeros((len(sources), first.Rows, first.Columns), dtype=np.uint8)
    for segment in meta["segmentAttributes"]:
        attributes = segment[0]
        value = code_to_value[attributes["SegmentedPropertyTypeCodeSequence"]["CodeValue"]]
        image = sitk.ReadImage(str(folder / f"{attributes['labelID']}.nrrd"))
        array = sitk.GetArrayFromImage(image)  # (k, j, i)
        k, j, i = np.nonzero(array)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        index = np.stack([i, j, k]).astype(float) * np.array(image.GetSpacing())[:, None]
        points_lps = np.array(image.GetOrigin())[:, None] + direction @ index
        slice_index = np.abs(slice_keys[None, :] - (normal @ points_lps)[:, None]).argmin(axis=1)
        offset = points_lps.T - origins[slice_index]
        cols = np.rint(offset @ row_dir / col_spacing).astype(int)
        rows = np.rint(offset @ col_dir / row_spacing).astype(int)
        result[slice_index, rows, cols] = value
    return result


@pytest.fixture(scope="module")
def truth_seg(small_study: WrittenStudy) -> Dataset:
    return dcmread(small_study.files.truth)


def test_seg_has_no_dciodvfy_errors(small_study: WrittenStudy) -> None:
    assert dciodvfy_errors(small_study.files.truth) == []


def test_seg_describes_each_muscle_with_snomed_codes(
    truth_seg: Dataset, small_study: WrittenStudy
) -> None:
    assert truth_seg.SOPClassUID == SegmentationStorage
    assert truth_seg.SegmentationType == "BINARY"
    assert truth_seg.StudyInstanceUID == small_study.study.study_instance_uid
    segments = {item.SegmentLabel: item for item in truth_seg.SegmentSequence}
    assert set(segments) == {label.name for label in LEG_MUSCLES}
    for label in LEG_MUSCLES:
        item = segments[label.name]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == label.type_code.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert item.SegmentAlgorithmType == "MANUAL"


def test_seg_references_sources_and_omits_empty_frames(
    truth_seg: Dataset, small_study: WrittenStudy
) -> None:
    labels = small_study.study.labels
    non_empty = sum(
        int(np.any(labels[s] == label.value)) for s in range(labels.shape[0])
        for label in LEG_MUSCLES
    )
    assert int(truth_seg.NumberOfFrames) == non_empty
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in truth_seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(small_study.study.sop_instance_uids)


def test_highdicom_round_trip_is_exact(truth_seg: Dataset, small_study: WrittenStudy) -> None:
    decoded = decode_segmentation(truth_seg, LEG_MUSCLES,
                                  [SourceFrame(uid) for uid in small_study.study.sop_instance_uids])
    np.testing.assert_array_equal(decoded.label_map, small_study.study.labels)
    assert set(decoded.algorithm_types.values()) == {"MANUAL"}


def test_dcmqi_reads_our_seg_voxel_for_voxel(small_study: WrittenStudy, tmp_path: Path) -> None:
    subprocess.run(
        [dcmqi_tool("segimage2itkimage"), "--inputDICOM", str(small_study.files.truth),
         "--outputDirectory", str(tmp_path), "--outputType", "nrrd"],
        check=True, capture_output=True, timeout=120,
    )
    from_dcmqi = label_map_from_dcmqi(tmp_path, source_headers(small_study))
    np.testing.assert_array_equal(from_dcmqi, small_study.study.labels)


def test_viewer_made_seg_is_decoded_by_segment_code(
    small_study: WrittenStudy, tmp_path: Path
) -> None:
    """A SEG written by dcmqi (as 3D Slicer saves edits) with renumbered segments."""
    sources = source_headers(small_study)
    truth = small_study.study.labels
    # Reverse the numbering: segment 1 in the viewer's file is our label 6, and so on.
    viewer_numbers = {label.value: len(LEG_MUSCLES) + 1 - label.value for label in LEG_MUSCLES}
    viewer_map = np.zeros_like(truth)
    for value, number in viewer_numbers.items():
        viewer_map[truth == value] = number
    image = sitk.GetImageFromArray(viewer_map)
    first = sources[0]
    image.SetOrigin([float(v) for v in first.ImagePositionPatient])
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    slice_step = float(np.linalg.norm(
        np.subtract(sources[1].ImagePositionPatient, first.ImagePositionPatient)))
    image.SetSpacing([col_spacing, row_spacing, slice_step])
    label_file = tmp_path / "edited.nrrd"
    sitk.WriteImage(image, str(label_file))
    attributes = [
        {
            "labelID": viewer_numbers[label.value],
            "SegmentDescription": f"edited {label.name}",
            "SegmentAlgorithmType": "MANUAL",
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": label.category_code.value, "CodingSchemeDesignator": "SCT",
                "CodeMeaning": label.category_code.meaning},
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": label.type_code.value, "CodingSchemeDesignator": "SCT",
                "CodeMeaning": label.type_code.meaning},
            "recommendedDisplayRGBValue": [200, 50, 50],
        }
        for label in sorted(LEG_MUSCLES, key=lambda lbl: viewer_numbers[lbl.value])
    ]
    meta = {
        "ContentCreatorName": "Radiologist^Test", "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1", "SeriesDescription": "Corrected", "SeriesNumber": "300",
        "InstanceNumber": "1", "BodyPartExamined": "LEG", "segmentAttributes": [attributes],
        "ContentLabel": "EDITED", "ContentDescription": "Corrected muscles",
    }
    meta_file = tmp_path / "meta.json"
    meta_file.write_text(json.dumps(meta))
    output = tmp_path / "edited.seg.dcm"
    subprocess.run(
        [dcmqi_tool("itkimage2segimage"), "--inputImageList", str(label_file),
         "--inputDICOMDirectory", str(small_study.files.images[0].parent),
         "--outputDICOM", str(output), "--inputMetadata", str(meta_file)],
        check=True, capture_output=True, timeout=120,
    )
    decoded = decode_segmentation(dcmread(output), LEG_MUSCLES,
                                  [SourceFrame(uid) for uid in small_study.study.sop_instance_uids])
    np.testing.assert_array_equal(decoded.label_map, truth)


def test_encode_refuses_a_label_map_that_does_not_fit(small_study: WrittenStudy) -> None:
    sources = source_headers(small_study)
    labels = small_study.study.labels
    algorithm = SegmentationAlgorithm("Dafne leg", "g1")
    uids = {"series_instance_uid": "1.2.3", "sop_instance_uid": "1.2.4"}
    with pytest.raises(ValueError, match="source frames"):
        encode_segmentation(labels[:-1], sources, LEG_MUSCLES, algorithm, **uids)
    with pytest.raises(ValueError, match="none of the labelled structures"):
        encode_segmentation(np.zeros_like(labels), sources, LEG_MUSCLES, algorithm, **uids)
    with pytest.raises(ValueError, match=r"values \[9\]"):
        encode_segmentation(np.where(labels == 1, 9, labels).astype(np.uint8), sources,
                            LEG_MUSCLES, algorithm, **uids)


def test_decode_refuses_a_seg_of_unknown_structures(truth_seg: Dataset) -> None:
    with pytest.raises(SegmentationError, match="no segment maps to a model label"):
        decode_segmentation(truth_seg, labels=[])
