"""Corrections: SEGs coming back are recognised, compared and queued, or refused with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dafne_node.api import create_app
from dafne_node.app.cli import main
from dafne_node.dicom.files import save_dataset_atomically
from dafne_node.inference.segmenter import SeriesSegmenter
from dafne_node.learning.examples import ExampleStore
from db.node_models import CorrectionState, Job, JobKind, JobState
from tests.conftest import WrittenStudy, write_phantom
from tests.learning.conftest import corrections, node_label_map, receive, run_all, write_seg
from tests.node.conftest import Node


def test_a_corrected_seg_becomes_a_queued_example_without_identifiers(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
) -> None:
    truth = small_study.study.labels
    receive(segmented, write_seg(tmp_path, small_study, truth, segmenter))
    run_all(segmented, segmenter)

    [correction] = corrections(segmented)
    assert correction.state == CorrectionState.QUEUED, correction.reason
    assert correction.source_series_uid == small_study.study.series_instance_uid
    assert sorted(correction.labels) == sorted(label.key for label in segmenter.labels)
    assert correction.unmapped == []
    assert set(correction.dice) == set(correction.labels)
    assert all(0.5 < value < 1.0 for value in correction.dice.values()), correction.dice
    assert correction.changed_slices, "the model's SEG is not the truth on every slice"
    assert (correction.model_name, correction.model_version) == ("Dafne leg", "g1")

    config = segmented[0]
    stored = ExampleStore(config.node.data_dir).load(correction.example_path)
    np.testing.assert_array_equal(stored.example.labels, truth)
    assert stored.example.pixels.shape == truth.shape
    raw = (config.node.data_dir / correction.example_path).read_bytes()
    for identifier in (small_study.study.series_instance_uid,
                       small_study.study.study_instance_uid, *small_study.study.sop_instance_uids):
        assert identifier.encode() not in raw


def test_the_nodes_own_seg_coming_back_is_an_echo(
    segmented: Node, segmenter: SeriesSegmenter,
) -> None:
    with segmented[1]() as session:
        job = session.scalars(select(Job).where(Job.kind == JobKind.SEGMENT)).one()
    receive(segmented, Path(job.result["seg_path"]))
    run_all(segmented, segmenter)
    assert corrections(segmented) == []
    with segmented[1]() as session:
        echo = session.scalars(select(Job).where(Job.kind == JobKind.CORRECTION)).one()
    assert (echo.state, echo.result) == (JobState.DONE, {"corrections": [], "echoes": 1})


def test_same_content_is_confirmed_and_a_newer_correction_supersedes_the_older(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
) -> None:
    receive(segmented, write_seg(tmp_path, small_study, small_study.study.labels, segmenter,
                                 name="first"))
    run_all(segmented, segmenter)
    ours = node_label_map(segmented, small_study, segmenter)
    receive(segmented, write_seg(tmp_path, small_study, ours, segmenter, name="resaved"))
    run_all(segmented, segmenter)

    first, resaved = corrections(segmented)
    assert resaved.state == CorrectionState.CONFIRMED
    assert resaved.example_path is None
    assert all(value == 1.0 for value in resaved.dice.values() if value is not None)
    assert (first.state, first.superseded_by_id) == (CorrectionState.SUPERSEDED, resaved.id)


def test_a_subset_of_labels_keeps_the_nodes_other_labels(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
) -> None:
    truth = small_study.study.labels
    soleus_only = np.where(truth == 1, 1, 0).astype(np.uint8)
    receive(segmented, write_seg(tmp_path, small_study, soleus_only, segmenter))
    run_all(segmented, segmenter)

    [correction] = corrections(segmented)
    assert correction.labels == ["soleus"] and set(correction.dice) == {"soleus"}
    stored = ExampleStore(segmented[0].node.data_dir).load(correction.example_path)
    ours = node_label_map(segmented, small_study, segmenter)
    assert stored.label_values == (1,)
    np.testing.assert_array_equal(stored.example.labels == 1, truth == 1)
    others = (ours > 1) & (truth != 1)
    np.testing.assert_array_equal(stored.example.labels[others], ours[others])


def test_bad_corrections_are_recorded_with_a_reason_and_block_nothing(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
) -> None:
    truth = small_study.study.labels
    stranger = write_phantom(tmp_path / "stranger", seed=11, slices=12, matrix=128)
    unknown_images = stranger.files.truth

    unknown_codes = dcmread(write_seg(tmp_path, small_study, truth, segmenter, name="codes"))
    for number, item in enumerate(unknown_codes.SegmentSequence, start=1):
        item.SegmentLabel = f"Region {number}"
        item.SegmentedPropertyTypeCodeSequence[0].CodeValue = "85756007"
        item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning = "Tissue"
    save_dataset_atomically(unknown_codes, tmp_path / "codes.dcm")

    shifted = dcmread(write_seg(tmp_path, small_study, truth, segmenter, name="shifted"))
    for group in shifted.PerFrameFunctionalGroupsSequence:
        position = group.PlanePositionSequence[0].ImagePositionPatient
        group.PlanePositionSequence[0].ImagePositionPatient = [position[0] + 7.0,
                                                               position[1], position[2]]
    save_dataset_atomically(shifted, tmp_path / "shifted.dcm")

    corrupt = tmp_path / "corrupt.dcm"
    good = write_seg(tmp_path, small_study, truth, segmenter, name="good")
    corrupt.write_bytes(good.read_bytes()[:3000])
    corrupt_ds = dcmread(good)
    corrupt_ds.SeriesInstanceUID = generate_uid()
    corrupt_ds.SOPInstanceUID = corrupt_ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    save_dataset_atomically(corrupt_ds, tmp_path / "corrupt-full.dcm")
    full = (tmp_path / "corrupt-full.dcm").read_bytes()
    corrupt.write_bytes(full[: len(full) - 2000])

    for path in (unknown_images, tmp_path / "codes.dcm", tmp_path / "shifted.dcm", corrupt,
                 good):
        receive(segmented, path)
    run_all(segmented, segmenter)

    found = {c.seg_sop_instance_uid: c for c in corrections(segmented)}
    by_file = {path.name: found[dcmread(path, stop_before_pixels=True).SOPInstanceUID]
               for path in (unknown_images, tmp_path / "codes.dcm", tmp_path / "shifted.dcm",
                            corrupt, good)}
    assert by_file["truth.seg.dcm"].state == CorrectionState.REJECTED
    assert "never received" in by_file["truth.seg.dcm"].reason
    assert by_file["codes.dcm"].state == CorrectionState.REJECTED
    assert "no segment maps to a model label" in by_file["codes.dcm"].reason
    assert by_file["codes.dcm"].reason.count("Region") == 6
    assert by_file["shifted.dcm"].state == CorrectionState.REJECTED
    assert "source geometry" in by_file["shifted.dcm"].reason
    assert by_file["corrupt.dcm"].state == CorrectionState.REJECTED
    assert by_file["good.dcm"].state == CorrectionState.QUEUED
    with segmented[1]() as session:
        states = set(session.scalars(select(Job.state).where(Job.kind == JobKind.CORRECTION)))
    assert states == {JobState.DONE}


def test_a_correction_whose_source_images_are_gone_is_unusable(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
) -> None:
    config = segmented[0]
    correction_file = write_seg(tmp_path, small_study, small_study.study.labels, segmenter)
    for path in (config.spool_dir / small_study.study.study_instance_uid).rglob("*.dcm"):
        path.unlink()
    receive(segmented, correction_file)
    run_all(segmented, segmenter)
    [correction] = corrections(segmented)
    assert correction.state == CorrectionState.UNUSABLE
    assert "source images are gone" in correction.reason


def test_corrections_are_listed_by_the_command_the_api_status_and_metrics(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, sessions = segmented
    truth = small_study.study.labels
    codes = dcmread(write_seg(tmp_path, small_study, truth, segmenter, name="codes"))
    codes.SegmentSequence[0].SegmentLabel = "Bone marrow"
    codes.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue = "14016003"
    save_dataset_atomically(codes, tmp_path / "codes.dcm")
    receive(segmented, tmp_path / "codes.dcm")
    run_all(segmented, segmenter)

    assert main(["corrections", "--json", "--data-dir", str(config.node.data_dir)]) == 0
    [item] = json.loads(capsys.readouterr().out)
    assert item["state"] == "queued"
    assert item["source_series_uid"] == small_study.study.series_instance_uid
    assert "soleus" not in item["labels"] and len(item["labels"]) == 5
    assert item["unmapped"] == ["1: Bone marrow (14016003 Soleus muscle)"]
    assert set(item["dice"]) == set(item["labels"])
    assert "reason" in item

    assert main(["corrections", "--data-dir", str(config.node.data_dir)]) == 0
    text = capsys.readouterr().out
    assert "queued" in text and "not mapped: 1: Bone marrow" in text

    app = create_app(session_factory=sessions, model_info=lambda: ("Dafne leg", 1))
    with TestClient(app) as client:
        listed = client.get("/corrections", params={"state": "queued"}).json()
        assert [entry["id"] for entry in listed] == [item["id"]]
        assert client.get("/corrections", params={"state": "bogus"}).status_code == 422
        assert client.get("/status").json()["corrections"]["queued"] == 1
        metrics = client.get("/metrics").text
    assert 'dafne_corrections{state="queued"} 1.0' in metrics


def test_native_pixel_data_wrapped_in_item_tags_is_rejected_with_the_reason(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
) -> None:
    """dcmjs 0.47.1-0.49.0 (OHIF 3.12) wrapped uncompressed pixel data in an item tag."""
    broken = dcmread(write_seg(tmp_path, small_study, small_study.study.labels, segmenter))
    data = bytes(broken.PixelData)
    broken.PixelData = b"\xfe\xff\x00\xe0" + len(data).to_bytes(4, "little") + data
    save_dataset_atomically(broken, tmp_path / "wrapped.dcm")
    receive(segmented, tmp_path / "wrapped.dcm")
    run_all(segmented, segmenter)
    [correction] = corrections(segmented)
    assert correction.state == CorrectionState.REJECTED
    assert "pixel data" in correction.reason, correction.reason
