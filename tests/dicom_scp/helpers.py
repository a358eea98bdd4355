"""Helpers for the DICOM-layer tests: dcmtk runner, test images, an in-memory index."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_scp.receiver import StorageServer
from dicom_scp.store import ReceivedInstance

DCMTK_TIMEOUT = 30


def dcmtk(
    tool: str, *args: str, timeout: float = DCMTK_TIMEOUT, nodelay: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool, with TCP_NODELAY as the node's peers should unless ``nodelay`` is
    False (Nagle on, as most modalities leave it)."""
    path = f"/usr/bin/{tool}"
    if not os.path.exists(path):
        pytest.skip(f"{path} not installed")
    environment = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    if nodelay:
        environment["TCP_NODELAY"] = "1"
    return subprocess.run(
        [path, *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def data_set_offset(raw: bytes) -> int:
    """Where the data set starts in a Part 10 file: after preamble, ``DICM`` and meta group."""
    return 144 + int.from_bytes(raw[140:144], "little")


def make_mr(
    folder: Path,
    count: int,
    *,
    size: int = 32,
    study: str | None = None,
    series: str | None = None,
    sop_class: str = MRImageStorage,
    modality: str = "MR",
) -> list[Path]:
    """Write ``count`` small images of one series; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    series = series or generate_uid()
    rng = np.random.default_rng(len(os.listdir(folder)))
    paths = []
    for number in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = modality
        ds.PatientID = "TEST01"
        ds.PatientName = "Test^Patient"
        ds.SeriesDescription = "t1 calf"
        ds.BodyPartExamined = "LEG"
        ds.SeriesNumber = 3
        ds.InstanceNumber = number + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class _Outcome:
    duplicate: bool
    spool_path: str


@dataclass
class MemoryIndex:
    """An in-memory ``InstanceIndex`` that records every batch it is given."""

    records: dict[str, ReceivedInstance] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def index_batch(self, records: Sequence[ReceivedInstance]) -> list[_Outcome]:
        with self.lock:
            self.batches.append(len(records))
            out = []
            for record in records:
                known = self.records.get(record.sop_instance_uid)
                if known is None:
                    self.records[record.sop_instance_uid] = record
                    out.append(_Outcome(False, record.spool_path))
                else:
                    out.append(_Outcome(True, known.spool_path))
            return out

    def indexed_files(self, sop_instance_uids: Sequence[str]) -> dict[str, ReceivedInstance]:
        with self.lock:
            return {uid: self.records[uid] for uid in sop_instance_uids if uid in self.records}


ServerFactory = Callable[..., StorageServer]
