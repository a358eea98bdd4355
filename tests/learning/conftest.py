"""Fixtures of the learning tests: a node that segmented a series, and SEGs coming back."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dafne_node.dicom.files import save_dataset_atomically
from dafne_node.dicom.seg_decode import SourceFrame, decode_segmentation
from dafne_node.dicom.seg_encode import SegmentationAlgorithm, encode_segmentation
from dafne_node.inference.segment import SegmentHandler
from dafne_node.inference.segmenter import SeriesSegmenter
from dafne_node.jobs.runner import JobRunner
from dafne_node.learning.corrections import CorrectionHandler
from db.base import utcnow
from db.node_models import Correction, Job, JobKind
from tests.conftest import WrittenStudy, write_phantom
from tests.node.conftest import Node, node, segmenter, spool_series

__all__ = ["node", "segmenter"]

RADIOLOGIST = SegmentationAlgorithm(name="Radiologist", version="1", kind="MANUAL")


def run_all(node: Node, segmenter: SeriesSegmenter) -> None:
    config, sessions = node
    runner = JobRunner(sessions, {
        JobKind.SEGMENT: SegmentHandler(sessions, config, segmenter),
        JobKind.CORRECTION: CorrectionHandler(sessions, config, segmenter.labels),
    }, "w1")
    for _ in range(20):
        if runner.run_once() is None:
            return
    raise AssertionError("jobs kept coming")


def headers(study: WrittenStudy) -> list[Dataset]:
    return [dcmread(path, stop_before_pixels=True) for path in study.files.images]


def write_seg(folder: Path, study: WrittenStudy, label_map: np.ndarray, segmenter:
              SeriesSegmenter, *, name: str = "correction") -> Path:
    seg = encode_segmentation(label_map, headers(study), segmenter.labels, RADIOLOGIST,
                              series_instance_uid=generate_uid(),
                              sop_instance_uid=generate_uid(), series_number=300)
    path = folder / f"{name}.dcm"
    save_dataset_atomically(seg, path)
    return path


def receive(node: Node, *paths: Path) -> None:
    spool_series(node, list(paths), received_at=utcnow() - timedelta(minutes=1))


def corrections(node: Node) -> list[Correction]:
    with node[1]() as session:
        return list(session.scalars(select(Correction).order_by(Correction.id)))


def node_label_map(node: Node, study: WrittenStudy, segmenter: SeriesSegmenter) -> np.ndarray:
    with node[1]() as session:
        job = session.scalars(select(Job).where(Job.kind == JobKind.SEGMENT)).one()
    frames = [SourceFrame(uid) for uid in study.study.sop_instance_uids]
    return decode_segmentation(dcmread(job.result["seg_path"]), segmenter.labels,
                               frames).label_map


@pytest.fixture
def segmented(node: Node, segmenter: SeriesSegmenter) -> Node:
    """The node holds the small phantom series and has made its SEG."""
    run_all(node, segmenter)
    return node


@pytest.fixture
def corrected(node: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy,
              tmp_path: Path) -> Node:
    """The node segmented two series and received a correction of each (ids 1 and 2)."""
    second = write_phantom(tmp_path / "second", seed=5, slices=12, matrix=128)
    receive(node, *second.files.images)
    run_all(node, segmenter)
    for index, study in enumerate((small_study, second)):
        label_map = study.study.labels.copy()
        label_map[index + 2] = 0  # a slice the radiologist cleared
        receive(node, write_seg(tmp_path, study, label_map, segmenter, name=f"fix{index}"))
        run_all(node, segmenter)
    return node
