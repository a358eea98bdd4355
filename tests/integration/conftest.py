"""Integration tests run real peers (Orthanc, dcmtk) inside ``unshare -n``: skip where impossible.

Creating a network namespace needs root, and Orthanc and dcmtk come from Debian packages
(``deploy/setup.sh``). Where any of that is missing every test in this folder is skipped with the
reason, instead of failing on a machine that simply cannot host the peers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dafne_node.phantom import make_study
from dafne_node.phantom.study import write_study
from deploy.netns import netns_unavailable_reason


@functools.cache
def _unavailable() -> str | None:
    return netns_unavailable_reason()


@pytest.fixture(autouse=True)
def _require_netns() -> None:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(f"integration peers unavailable: {reason}")


@dataclass(frozen=True)
class PhantomFiles:
    """A small phantom MR series on disk with two SEGs: the truth and a viewer's edited copy.

    ``truth`` stands for the node's result (same study, references the images); ``viewer_seg``
    is a new series and instance of the same segmentation, as a viewer saves a corrected SEG.
    """

    images: list[Path]
    truth: Path
    viewer_seg: Path


@pytest.fixture
def phantom(tmp_path: Path) -> PhantomFiles:
    """An 8-slice 64x64 site-A series (about 1 s to make), written under ``tmp_path/study``."""
    files = write_study(make_study(site="A", seed=1, slices=8, matrix=64), tmp_path / "study")
    viewer = pydicom.dcmread(files.truth)
    viewer.SeriesInstanceUID = generate_uid()
    viewer.SOPInstanceUID = generate_uid()
    viewer.file_meta.MediaStorageSOPInstanceUID = viewer.SOPInstanceUID
    viewer.SeriesDescription = "Corrected by radiologist"
    viewer_seg = tmp_path / "viewer.seg.dcm"
    viewer.save_as(viewer_seg, enforce_file_format=True)
    return PhantomFiles(images=files.images, truth=files.truth, viewer_seg=viewer_seg)
