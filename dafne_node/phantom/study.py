"""Write a phantom study to disk: the MR images and their ground-truth DICOM-SEG.

The truth is written by the project's own SEG writer, so the same code path
that sends results to PACS is exercised by every phantom, and the truth can be
opened in any viewer beside the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from dafne_node.dicom.files import save_dataset_atomically
from dafne_node.dicom.seg_encode import SegmentationAlgorithm, encode_segmentation
from dafne_node.model.labels import LEG_MUSCLES
from dafne_node.phantom.dicom import write_images
from dafne_node.phantom.render import PhantomStudy

TRUTH_ALGORITHM = SegmentationAlgorithm(name="Dafne phantom", version="truth", kind="MANUAL")
"""Recorded in the truth SEG: drawn by the phantom generator, not by a model."""

TRUTH_FILE_NAME = "truth.seg.dcm"


@dataclass(frozen=True)
class StudyFiles:
    """Where a written phantom study lies."""

    images: list[Path]
    truth: Path


def write_study(study: PhantomStudy, out_dir: Path) -> StudyFiles:
    """Write ``out_dir/images/*.dcm`` and ``out_dir/truth.seg.dcm`` for ``study``."""
    images = write_images(study, out_dir)
    sources = [dcmread(path, stop_before_pixels=True) for path in images]
    truth_uid = [study.series_instance_uid, "truth"]
    seg = encode_segmentation(
        study.labels,
        sources,
        LEG_MUSCLES,
        TRUTH_ALGORITHM,
        series_instance_uid=generate_uid(entropy_srcs=[*truth_uid, "series"]),
        sop_instance_uid=generate_uid(entropy_srcs=[*truth_uid, "instance"]),
        series_number=999,
        series_description="Phantom ground truth",
    )
    truth = out_dir / TRUTH_FILE_NAME
    save_dataset_atomically(seg, truth)
    return StudyFiles(images=images, truth=truth)
