"""Corrections saved by the real writers viewers use are understood, whatever their habits.

Each case writes the phantom's truth (which differs from the model's SEG) with a genuine
writer — highdicom, dcmqi (3D Slicer), dcmjs (OHIF v2) and @cornerstonejs/adapters (OHIF v3)
— in the variations found in the wild, sends it to the node, and checks that the node
queued a training example whose label map is the truth on the labels the SEG covers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from dafne_node.inference.segmenter import SeriesSegmenter
from dafne_node.learning.examples import ExampleStore
from db.node_models import CorrectionState, Job, JobKind
from tests.conftest import WrittenStudy
from tests.harness.writers import (
    SegmentSpec,
    leg_segments,
    node_writers_missing,
    ohif_segments,
    write_cornerstone,
    write_dcmjs,
    write_dcmqi,
    write_highdicom,
)
from tests.learning.conftest import corrections, node_label_map, receive, run_all
from tests.node.conftest import Node

ALL = ["soleus", "gastrocnemius_medial", "gastrocnemius_lateral", "tibialis_anterior",
       "extensor_digitorum_longus", "peroneus"]
TIBIA = SegmentSpec(value=7, label="Tibia", type_code=("12611008", "SCT", "Tibia"))
needs_node = pytest.mark.skipif(node_writers_missing() is not None,
                                reason=str(node_writers_missing()))

Writer = Callable[[list[Path], np.ndarray, list[SegmentSpec], Path], Path]


def reordered(segments: list[SegmentSpec]) -> list[SegmentSpec]:
    """Segments in reverse order, renumbered 1..n: segment 1 is now the peroneus."""
    return [replace(spec, number=number)
            for number, spec in enumerate(reversed(segments), start=1)]


def with_tibia(truth: np.ndarray) -> np.ndarray:
    """The truth plus a region labelled 7 (a structure the model does not know)."""
    extra = truth.copy()
    extra[:, :6, :6] = 7
    return extra


CASES: dict[str, tuple[Writer, Callable[[], list[SegmentSpec]], list[str], int]] = {
    # name: (writer, segments, mapped label keys, unmapped count)
    "highdicom binary": (write_highdicom, leg_segments, ALL, 0),
    "highdicom fractional": (
        lambda s, m, g, o: write_highdicom(s, m, g, o, fractional=True), leg_segments, ALL, 0),
    "highdicom geometry per frame, empty frames kept": (
        lambda s, m, g, o: write_highdicom(s, m, g, o, geometry_per_frame_only=True,
                                           omit_empty_frames=False), leg_segments, ALL, 0),
    "highdicom reordered and renumbered": (
        write_highdicom, lambda: reordered(leg_segments()), ALL, 0),
    "highdicom subset": (write_highdicom, lambda: leg_segments()[:3], ALL[:3], 0),
    "highdicom unknown extra segment": (
        write_highdicom, lambda: [*leg_segments(), replace(TIBIA, number=7)], ALL, 1),
    "dcmqi (3D Slicer)": (write_dcmqi, leg_segments, ALL, 0),
    "dcmqi reordered, extra segment": (
        write_dcmqi, lambda: reordered([*leg_segments(), TIBIA]), ALL, 1),
    "dcmjs (OHIF v2), FRACTIONAL RLE": (write_dcmjs, leg_segments, ALL, 0),
    "dcmjs, names only": (write_dcmjs, lambda: ohif_segments(leg_segments()), ALL, 0),
    "cornerstone (OHIF v3)": (write_cornerstone, leg_segments, ALL, 0),
    "cornerstone subset, reordered": (
        write_cornerstone, lambda: reordered(leg_segments()[2:]), ALL[2:], 0),
}
NODE_WRITERS = {write_dcmjs, write_cornerstone}


@pytest.mark.parametrize("case", list(CASES))
def test_every_writer_s_correction_is_queued_with_the_truth(
    case: str, segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy,
    tmp_path: Path,
) -> None:
    writer, segments, expected, unmapped = CASES[case]
    if writer in NODE_WRITERS and node_writers_missing():
        pytest.skip(str(node_writers_missing()))
    truth = small_study.study.labels
    chosen = segments()
    label_map = with_tibia(truth) if unmapped else truth
    label_map = np.where(np.isin(label_map, [spec.value for spec in chosen]), label_map, 0)
    written = writer(list(small_study.files.images), label_map, chosen, tmp_path / "c.dcm")
    receive(segmented, written)
    run_all(segmented, segmenter)

    [correction] = corrections(segmented)
    assert correction.state == CorrectionState.QUEUED, correction.reason
    assert sorted(correction.labels) == sorted(expected)
    assert len(correction.unmapped) == unmapped, correction.unmapped
    if unmapped:
        assert "Tibia" in correction.unmapped[0]
    assert correction.source_series_uid == small_study.study.series_instance_uid
    stored = ExampleStore(segmented[0].node.data_dir).load(correction.example_path)
    covered = [number for number, key in enumerate(ALL, start=1) if key in expected]
    assert sorted(stored.label_values) == covered
    for value in covered:
        np.testing.assert_array_equal(stored.example.labels == value, truth == value,
                                      err_msg=f"label {value}")


@needs_node
def test_ohif_save_to_current_adds_an_instance_to_the_nodes_seg_series(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
) -> None:
    """OHIF's "save to current" writes a new instance into the node's own SEG series; PACS
    routes the whole series back: the node's instance is an echo, the new one a correction."""
    with segmented[1]() as session:
        job = session.scalars(select(Job).where(Job.kind == JobKind.SEGMENT)).one()
    ours = Path(job.result["seg_path"])
    series_uid = dcmread(ours, stop_before_pixels=True).SeriesInstanceUID
    edited = node_label_map(segmented, small_study, segmenter).copy()
    truth = small_study.study.labels
    edited[edited == 4] = 0  # the radiologist redrew the tibialis anterior
    edited[truth == 4] = 4
    written = write_cornerstone(list(small_study.files.images), edited,
                                ohif_segments(leg_segments()), tmp_path / "saved.dcm",
                                series_instance_uid=series_uid)
    receive(segmented, ours)
    receive(segmented, written)
    run_all(segmented, segmenter)

    [correction] = corrections(segmented)
    assert correction.state == CorrectionState.QUEUED, correction.reason
    assert sorted(correction.labels) == sorted(ALL)
    assert correction.dice["tibialis_anterior"] < 1.0
    assert correction.dice["soleus"] == 1.0, "far from the edit: unchanged"
    with segmented[1]() as session:
        jobs = list(session.scalars(select(Job).where(Job.kind == JobKind.CORRECTION)))
    assert sum(job.result["echoes"] for job in jobs) >= 1
