"""Corrupt pixel data: the job fails at once with the reason; the worker goes on to the next series.

Each case is the small phantom series with one image broken the way a peer can break
it (or every image, where the header is the bomb). All of them are spooled into one
node, followed by a valid series, and one real worker runs the queue: every corrupt
job must fail on its first attempt with a readable reason logged once, and the valid
series after them must be segmented normally by that same worker.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    MPEG2MPML,
    EnhancedMRImageStorage,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from sqlalchemy import select

from dafne_node.dicom import series as volume
from dafne_node.dicom.codestream import FrameShape, frame_problem
from dafne_node.dicom.series import InputError, load_volume, read_series
from dafne_node.inference.segmenter import SeriesSegmenter
from db.base import utcnow
from db.node_models import Job, JobState, Series
from tests.conftest import WrittenStudy
from tests.node.conftest import Node, make_node, segment_runner, spool_series

BROKEN = 5
"""Index of the broken image in a one-broken-image case (Instance Number 6)."""

ALL = tuple(range(12))


def pydicom_file(name: str) -> Path:
    """A file of pydicom's test data (pydicom-data is a dev dependency)."""
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(found)


def frames_of(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))


def set_frames(ds: Dataset, frames: list[bytes], *, offset_table: bool = False) -> None:
    ds.PixelData = encapsulate(frames, has_bot=offset_table)
    ds["PixelData"].VR = "OB"


def garbage(size: int) -> bytes:
    return np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()


def patch_pixel_length(data: bytes, length: int) -> bytes:
    """Rewrite the value length of the (Explicit VR Little Endian) Pixel Data element."""
    at = data.rindex(b"\xe0\x7f\x10\x00OW\x00\x00") + 8
    return data[:at] + length.to_bytes(4, "little") + data[at + 4:]


def rle_garbage_segments(ds: Dataset) -> None:
    """A valid RLE header over garbage segments: pylibjpeg-rle panics (a BaseException)."""
    frame = frames_of(ds)[0]
    set_frames(ds, [frame[:64] + garbage(len(frame) - 64)])


def j2k_larger_than_header(ds: Dataset) -> None:
    """A JPEG 2000 frame whose SIZ declares 30000x30000: the decoder would allocate that."""
    frame = bytearray(frames_of(ds)[0])
    frame[8:16] = (30000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    set_frames(ds, [bytes(frame)])


def foreign_jpeg_lossless(ds: Dataset) -> None:
    """A real JPEG Lossless SV1 frame of another image (1024x256 NM) in a 128x128 MR."""
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    set_frames(ds, frames_of(dcmread(pydicom_file("JPEG-LL.dcm"))))


def in_syntax(syntax: str, frames: list[bytes]) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = syntax
        set_frames(ds, frames)
    return change


def matrix(size: int) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.Rows = ds.Columns = size
    return change


def enhanced_mr(study: WrittenStudy) -> Dataset:
    """The small phantom as one Enhanced MR image, frames in slice order."""
    slices = [dcmread(path) for path in study.files.images]
    ds = slices[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.NumberOfFrames = len(slices)
    measures, orientation, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = ds.PixelSpacing
    measures.SliceThickness = ds.SliceThickness
    orientation.ImageOrientationPatient = ds.ImageOrientationPatient
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for image in slices:
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = image.ImagePositionPatient
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "SliceLocation"):
        delattr(ds, keyword)
    ds.PixelData = b"".join(image.PixelData for image in slices)
    return ds


@dataclass(frozen=True)
class Corruption:
    """How to break a series, and what the job's reason must say."""

    reason: str
    compress: str | None = None
    dataset: Callable[[Dataset], None] | None = None
    file_bytes: Callable[[bytes], bytes] | None = None
    broken: tuple[int, ...] = (BROKEN,)
    enhanced: bool = False


CORRUPTIONS = {
    # Native (uncompressed) pixel data.
    "pixel-data-short": Corruption(
        "Pixel Data is 31,768 bytes, fewer than the 32,768 of the 128x128 16-bit image",
        dataset=lambda ds: setattr(ds, "PixelData", ds.PixelData[:-1000])),
    "pixel-data-long": Corruption(
        "Pixel Data is 36,768 bytes, more than the 32,768",
        dataset=lambda ds: setattr(ds, "PixelData", ds.PixelData + bytes(4000))),
    "no-pixel-data": Corruption("has no Pixel Data", dataset=lambda ds: delattr(ds, "PixelData")),
    "file-truncated": Corruption(
        "the file is truncated: its Pixel Data declares 32,768 bytes and the file holds 27,768",
        file_bytes=lambda data: data[:-5000]),
    "length-past-end-of-file": Corruption(
        "the file is truncated: its Pixel Data declares 36,768 bytes and the file holds 32,768",
        file_bytes=lambda data: patch_pixel_length(data, 36768)),
    "length-short-of-the-data": Corruption(
        "Pixel Data is 20,000 bytes, fewer than the 32,768",
        file_bytes=lambda data: patch_pixel_length(data, 20000)),
    "bits-allocated-12": Corruption(
        "Bits Allocated 12, Bits Stored 12, Pixel Representation 0 do not describe",
        dataset=lambda ds: setattr(ds, "BitsAllocated", 12)),
    "pixel-representation-2": Corruption(
        "Pixel Representation 2 do not describe",
        dataset=lambda ds: setattr(ds, "PixelRepresentation", 2)),
    "bits-stored-over-allocated": Corruption(
        "Bits Stored 20", dataset=lambda ds: setattr(ds, "BitsStored", 20)),
    "frames-in-a-single-frame-image": Corruption(
        "Number of Frames is 2 in a single-frame image",
        dataset=lambda ds: setattr(ds, "NumberOfFrames", 2)),
    # Compressed frames among good compressed images of the same series.
    "rle-garbage": Corruption(
        "its RLE header lists", RLELossless, dataset=lambda ds: set_frames(ds, [garbage(3000)])),
    "rle-garbage-segments": Corruption(
        "pixel data cannot be decoded (RLE Lossless): the decoder crashed", RLELossless,
        dataset=rle_garbage_segments),
    "rle-truncated-frame": Corruption(
        "pixel data cannot be decoded (RLE Lossless)", RLELossless,
        dataset=lambda ds: set_frames(ds, [frames_of(ds)[0][:-2000]])),
    "rle-extra-frame": Corruption(
        "the encapsulated Pixel Data holds 2 frames, the header declares 1", RLELossless,
        dataset=lambda ds: set_frames(ds, frames_of(ds) * 2, offset_table=True)),
    "rle-file-truncated": Corruption(
        "truncated: the file ends inside an element of undefined length", RLELossless,
        file_bytes=lambda data: data[:-3000]),
    "jpeg-ls-garbage": Corruption(
        "does not start with a JPEG start-of-image marker", JPEGLSLossless,
        dataset=lambda ds: set_frames(ds, [garbage(3000)])),
    "jpeg-ls-truncated": Corruption(
        "ends without an end-of-image marker: the frame is truncated", JPEGLSLossless,
        dataset=lambda ds: set_frames(ds, [frames_of(ds)[0][:3000]])),
    "jpeg-2000-garbage": Corruption(
        "does not start with a JPEG 2000 codestream", JPEG2000Lossless,
        dataset=lambda ds: set_frames(ds, [garbage(3000)])),
    "jpeg-2000-truncated": Corruption(
        "ends without an end-of-image marker: the frame is truncated", JPEG2000Lossless,
        dataset=lambda ds: set_frames(ds, [frames_of(ds)[0][:3000]])),
    "jpeg-2000-larger-than-header": Corruption(
        "its codestream declares a 30000x30000 image", JPEG2000Lossless,
        dataset=j2k_larger_than_header),
    "jpeg-lossless-garbage": Corruption(
        "its JPEG marker segments are corrupt at byte 2",
        dataset=in_syntax(JPEGLosslessSV1, [b"\xff\xd8\x00" + garbage(3000)])),
    "jpeg-lossless-frame-of-another-size": Corruption(
        "its codestream declares a 1024x256 image (1 sample(s) per pixel) where the DICOM "
        "header declares 128x128 (1)", dataset=foreign_jpeg_lossless),
    "no-decoder": Corruption(
        "the node has no decoder for MPEG2 Main Profile / Main Level",
        dataset=in_syntax(MPEG2MPML, [garbage(4000)])),
    # Absurd sizes, refused from the header before a decoder allocates them.
    "matrix-65535": Corruption(
        "the header declares a 65535x65535 image; the node reads images of at most 2048x2048",
        dataset=matrix(65535), broken=ALL),
    "matrix-65535-rle": Corruption(
        "the header declares a 65535x65535 image", RLELossless, dataset=matrix(65535),
        broken=ALL),
    # One Enhanced MR image holding the whole series.
    "enhanced-2**31-frames": Corruption(
        "the header declares 2147483647 frames of 128x128, 35,184,372,072,448 voxels; the node "
        "reads at most 268,435,456", dataset=lambda ds: setattr(ds, "NumberOfFrames", 2**31 - 1),
        broken=(0,), enhanced=True),
    "enhanced-rle-frame-missing": Corruption(
        "the encapsulated Pixel Data holds 11 frames, the header declares 12", RLELossless,
        dataset=lambda ds: set_frames(ds, frames_of(ds)[:-1], offset_table=True),
        broken=(0,), enhanced=True),
    "enhanced-frame-position-missing": Corruption(
        "11 per-frame positions for 12 frames",
        dataset=lambda ds: ds.PerFrameFunctionalGroupsSequence.pop(), broken=(0,), enhanced=True),
}


def write_series(study: WrittenStudy, folder: Path, name: str, corruption: Corruption
                 ) -> list[Path]:
    """A copy of ``study`` as a series of its own (new UIDs), broken as ``corruption`` says."""
    folder.mkdir()
    if corruption.enhanced:
        datasets = [enhanced_mr(study)]
    else:
        datasets = [dcmread(path) for path in study.files.images]
    paths = []
    for index, ds in enumerate(datasets):
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[name, "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[name, "series"])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if corruption.compress is not None:
            ds.compress(corruption.compress)
        if index in corruption.broken and corruption.dataset is not None:
            corruption.dataset(ds)
        path = folder / f"IM{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=False)
        if index in corruption.broken and corruption.file_bytes is not None:
            path.write_bytes(corruption.file_bytes(path.read_bytes()))
        paths.append(path)
    return paths


class Recorder(logging.Handler):
    """Keeps the records logged at WARNING or above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def recording() -> Iterator[Recorder]:
    """Record what any logger emits at WARNING or above inside the block."""
    recorder, root = Recorder(), logging.getLogger()
    level = root.level
    root.addHandler(recorder)
    if level > logging.WARNING:
        root.setLevel(logging.WARNING)
    try:
        yield recorder
    finally:
        root.removeHandler(recorder)
        root.setLevel(level)


@dataclass
class Outcome:
    """A corrupt series' job, the SOP Instance UID of its broken image, what was logged."""

    job: Job
    broken_sop_uid: str
    logged: list[logging.LogRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    """What one worker did with every corrupt series and then a valid one."""

    outcomes: dict[str, Outcome]
    valid_job: Job
    idle_after: bool


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, small_study: WrittenStudy,
        segmenter: SeriesSegmenter) -> Run:
    """Queue every corrupt series, then the valid phantom; one worker runs the whole queue."""
    folder = tmp_path_factory.mktemp("corrupt")
    node = make_node(folder)
    _config, sessions = node
    started = utcnow() - timedelta(hours=1)
    broken_uids = {}
    for offset, (name, corruption) in enumerate(CORRUPTIONS.items()):
        files = write_series(small_study, folder / name, name, corruption)
        spool_series(node, files, received_at=started + timedelta(seconds=offset))
        broken_uids[name] = dcmread(files[corruption.broken[0]],
                                    stop_before_pixels=True).SOPInstanceUID
    spool_series(node, small_study.files.images, received_at=started + timedelta(minutes=1))

    worker = segment_runner(node, segmenter)
    logged_by_job: dict[int, list[logging.LogRecord]] = {}
    for _ in range(len(CORRUPTIONS) + 1):
        with recording() as recorder:
            worker.run_once()
        for job_id in {r.job_id for r in recorder.records if hasattr(r, "job_id")}:
            logged_by_job[job_id] = recorder.records
    idle_after = worker.run_once() is None

    with sessions() as session:
        jobs = {series.series_instance_uid: job for job, series in session.execute(
            select(Job, Series).join(Series, Job.series_id == Series.id))}
    outcomes = {}
    for name in CORRUPTIONS:
        job = jobs[generate_uid(entropy_srcs=[name, "series"])]
        outcomes[name] = Outcome(job, broken_uids[name], logged_by_job.get(job.id, []))
    return Run(outcomes, jobs[small_study.study.series_instance_uid], idle_after)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_pixel_data_fails_its_job_at_once_with_the_reason(name: str, run: Run) -> None:
    outcome, corruption = run.outcomes[name], CORRUPTIONS[name]
    job = outcome.job
    assert job.state == JobState.FAILED
    assert job.attempts == 1  # a permanent failure, not retried as an unexpected error
    error = job.error or ""
    assert corruption.reason in error
    assert "\n" not in error and "Traceback" not in error
    assert not re.match(r"\w+(Error|Exception)\b", error)  # a sentence, not an exception name
    # The reason names the broken image: its spool file is named by SOP Instance UID, and
    # where the header could be read the instance number is given for the scanner console.
    assert outcome.broken_sop_uid in error
    if name != "rle-file-truncated":
        assert f"(instance {corruption.broken[0] + 1})" in error
    # Logged once, as one line, without a traceback; no library logged an error of its own.
    [record] = [r for r in outcome.logged if r.name.startswith("dafne_node")]
    assert (record.name, record.levelno) == ("dafne_node.jobs.lifecycle", logging.ERROR)
    assert record.getMessage() == f"job {job.id} failed: {error}"
    assert record.exc_info is None
    assert [r for r in outcome.logged if r.levelno >= logging.ERROR] == [record]


def test_the_valid_series_queued_after_them_is_segmented_by_the_same_worker(run: Run) -> None:
    job = run.valid_job
    assert (job.state, job.attempts, job.error) == (JobState.SENDING, 1, None)
    assert job.result is not None and dcmread(job.result["seg_path"]).Modality == "SEG"
    assert run.idle_after  # no corrupt job came back for another attempt


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless],
                         ids=["rle", "jpeg-ls", "jpeg-2000"])
def test_valid_compressed_series_passes_the_checks(
    syntax: str, tmp_path: Path, small_study: WrittenStudy,
) -> None:
    files = write_series(small_study, tmp_path / "compressed", syntax,
                         Corruption("", compress=syntax, broken=()))
    [series], refusals = read_series(files)
    assert not refusals
    [native], _ = read_series(small_study.files.images)
    assert np.array_equal(load_volume(series).pixels, load_volume(native).pixels)


@pytest.mark.parametrize("syntax", [None, RLELossless], ids=["native", "rle"])
def test_valid_enhanced_mr_passes_the_checks(
    syntax: str | None, tmp_path: Path, small_study: WrittenStudy,
) -> None:
    files = write_series(small_study, tmp_path / "enhanced", "enhanced",
                         Corruption("", compress=syntax, broken=(), enhanced=True))
    [series], _ = read_series(files)
    [native], _ = read_series(small_study.files.images)
    assert np.array_equal(load_volume(series).pixels, load_volume(native).pixels)


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_real_jpeg_lossless_frames_pass_and_their_truncations_do_not(name: str) -> None:
    ds = dcmread(pydicom_file(name))
    shape = FrameShape(ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated)
    [frame] = frames_of(ds)
    assert frame_problem(ds.file_meta.TransferSyntaxUID, frame, shape) is None
    problem = frame_problem(ds.file_meta.TransferSyntaxUID, frame[:len(frame) // 2], shape)
    assert problem is not None and "truncated" in problem


def test_a_series_over_the_voxel_limit_is_refused_before_decoding(
    small_study: WrittenStudy, monkeypatch: pytest.MonkeyPatch,
) -> None:
    [series], _ = read_series(small_study.files.images)
    monkeypatch.setattr(volume, "MAX_SERIES_VOXELS", 12 * 128 * 128 - 1)
    with pytest.raises(InputError, match="196,608 voxels; the node segments at most 196,607"):
        load_volume(series)
    assert all(ds.get_item("PixelData", keep_deferred=True).value is None
               for ds in series.datasets)  # deferred by the reader, and never read since


class FakePanic(BaseException):
    """Like pyo3's PanicException: what a native library raises when it panics."""


def test_a_panic_outside_the_decoders_is_an_unexpected_failure_not_a_dead_worker(
    node: Node, segmenter: SeriesSegmenter, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def panic(*_: object, **__: object) -> None:
        raise FakePanic("index out of bounds")

    monkeypatch.setattr(segmenter, "segment_series", panic)
    _config, sessions = node
    assert segment_runner(node, segmenter).run_once() is None
    with sessions() as session:
        job = session.scalars(select(Job)).one()
    # Not the input's fault as far as anyone knows: retried later, like any unexpected error.
    assert (job.state, job.attempts, job.error) == (
        JobState.QUEUED, 1, "FakePanic: index out of bounds")
