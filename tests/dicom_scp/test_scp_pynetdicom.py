"""Exact statuses and negotiation results, seen from a pynetdicom SCU."""

from __future__ import annotations

import gc
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MRImageStorage,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from dicom_scp.ae import DEFAULT_MAX_PDU
from dicom_scp.policy import DiskWatermark
from tests.dicom_scp.helpers import MemoryIndex, ServerFactory, data_set_offset

RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"


@contextmanager
def associate(port: int, contexts: list[object], ae_title: str = "SCU") -> Iterator[Association]:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title="DAFNE")  # type: ignore[arg-type]
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def test_negotiation(scp: ServerFactory) -> None:
    server = scp()
    contexts = [
        build_context(RT_PLAN),
        build_context(MRImageStorage, [JPEGBaseline8Bit, ExplicitVRLittleEndian]),
        build_context("1.2.840.10008.5.1.4.1.1.4.1", [JPEG2000Lossless]),
        build_context("1.2.840.10008.5.1.4.1.1.66.4", [ImplicitVRLittleEndian]),
    ]
    with associate(server.port, contexts) as assoc:
        accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assert rejected == {RT_PLAN}
        # lossless before lossy: a sender offering both is not made to compress
        assert accepted[MRImageStorage] == ExplicitVRLittleEndian
        assert accepted["1.2.840.10008.5.1.4.1.1.4.1"] == JPEG2000Lossless
        assert accepted["1.2.840.10008.5.1.4.1.1.66.4"] == ImplicitVRLittleEndian
        assert assoc.acceptor.maximum_length == DEFAULT_MAX_PDU


def _status(response: Dataset) -> tuple[int, str]:
    return int(response.Status), str(response.get("ErrorComment", ""))


def test_bad_data_sets_fail_alone(
    scp: ServerFactory, mr_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = MemoryIndex()
    server = scp(index=index)
    good = dcmread(mr_files[0])
    no_series = dcmread(mr_files[1])
    del no_series.SeriesInstanceUID
    mislabelled = tmp_path / "mislabelled.dcm"  # CT data set in an MR C-STORE
    raw = mr_files[2].read_bytes()
    meta_end = data_set_offset(raw)
    body = raw[meta_end:].replace(b"1.2.840.10008.5.1.4.1.1.4\0", b"1.2.840.10008.5.1.4.1.1.2\0")
    mislabelled.write_bytes(raw[:meta_end] + body)
    garbage = tmp_path / "garbage.dcm"
    raw = mr_files[3].read_bytes()
    garbage.write_bytes(raw[:meta_end] + b"\x08\x00\x18\x00UI\xff\x7f" + b"\xfe" * 200)

    contexts = [build_context(MRImageStorage, [ExplicitVRLittleEndian])]
    with (
        caplog.at_level(logging.WARNING, logger="dicom_scp"),
        associate(server.port, contexts) as a,
    ):
        missing = _status(a.send_c_store(no_series))
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the files' bytes undecoded
        try:
            mismatch = _status(a.send_c_store(mislabelled))
            undecodable = _status(a.send_c_store(garbage))
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        fine = _status(a.send_c_store(good))
        assert a.is_established  # the association carried on through all of it
    assert missing[0] == 0xC000 and "SeriesInstanceUID" in missing[1]
    assert mismatch[0] == 0xA900 and "SOP Class" in mismatch[1]
    assert undecodable[0] == 0xC000
    assert any(word in undecodable[1] for word in ("parse", "lacks", "unreadable"))
    assert fine == (0x0000, "")
    assert list(index.records) == [good.SOPInstanceUID]
    assert caplog.text.count("refused with 0x") == 3


def test_watermark_status_and_comment(
    scp: ServerFactory, mr_files: list[Path], tmp_path: Path
) -> None:
    server = scp(watermark=DiskWatermark(tmp_path, 2**62))
    with associate(server.port, [build_context(MRImageStorage)]) as assoc:
        status, comment = _status(assoc.send_c_store(dcmread(mr_files[0])))
    assert status == 0xA700
    assert "below the watermark" in comment


class _BrokenIndex:
    def index_batch(self, records: object) -> list[object]:
        raise RuntimeError("database is down")


def test_index_failure_is_a_refusal_not_a_crash(scp: ServerFactory, mr_files: list[Path]) -> None:
    server = scp(index=_BrokenIndex())
    with associate(server.port, [build_context(MRImageStorage)]) as assoc:
        first = _status(assoc.send_c_store(dcmread(mr_files[0])))
        second = _status(assoc.send_c_store(dcmread(mr_files[1])))
        assert assoc.is_established
    assert first[0] == second[0] == 0xA702
    assert "index write failed" in first[1]


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian],
    ids=["implicit", "big-endian", "deflated"],
)
def test_other_transfer_syntaxes_are_stored_as_sent(
    scp: ServerFactory, mr_files: list[Path], syntax: str
) -> None:
    index = MemoryIndex()
    server = scp(index=index)
    ds = dcmread(mr_files[4])
    if syntax == ExplicitVRBigEndian:  # pynetdicom does not convert byte order for us
        ds.PixelData = ds.pixel_array.byteswap().tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        encoded = io.BytesIO()
        dcmwrite(encoded, ds, implicit_vr=False, little_endian=False, force_encoding=True)
        encoded.seek(0)
        ds = dcmread(encoded)
    with associate(server.port, [build_context(MRImageStorage, [syntax])]) as assoc:
        assert _status(assoc.send_c_store(ds))[0] == 0
    record = index.records[ds.SOPInstanceUID]
    assert record.transfer_syntax_uid == syntax
    assert record.series_instance_uid == ds.SeriesInstanceUID
    assert record.modality == "MR"
    stored = dcmread(server.spool.path(record.spool_path))
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert stored.SeriesDescription == ds.SeriesDescription
    assert stored.PixelData == ds.PixelData


def test_many_instances_in_one_association(scp: ServerFactory, mr_files: list[Path]) -> None:
    # C-ECHO and C-STORE interleaved on one association, through the inline store path
    index = MemoryIndex()
    server = scp(index=index)
    contexts = [build_context(MRImageStorage), build_context("1.2.840.10008.1.1")]
    datasets = [dcmread(path) for path in mr_files]
    with associate(server.port, contexts) as assoc:
        for ds in datasets:
            assert int(assoc.send_c_echo().Status) == 0
            assert int(assoc.send_c_store(ds).Status) == 0
    assert set(index.records) == {ds.SOPInstanceUID for ds in datasets}


def test_the_accept_loop_never_forces_a_full_collection(
    scp: ServerFactory, mr_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's loop runs ``gc.collect()`` every 60 polls (12 s here): a GIL-holding heap
    walk that would stall every association; the receiver's loop leaves it to Python."""
    collections: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *generation: collections.append(1) or 0)
    server = scp()
    assert server._server is not None
    for _ in range(3 * 60):
        server._server.service_actions()
    with associate(server.port, [build_context(MRImageStorage)]) as assoc:
        assert assoc.send_c_store(dcmread(mr_files[0])).Status == 0x0000
    assert collections == []
