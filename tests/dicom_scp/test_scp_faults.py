"""Every fault on the receive path gets an answer, one log line, and frees its slot.

Each case sends, on a raw socket, something pynetdicom's own loops would have let kill
the receive thread (with a traceback on stderr and no answer for the peer): broken
command sets, PDUs of the wrong kind or size, data sets larger than the node takes.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage

from deploy.rawpeer import (
    A_ABORT_TYPE,
    A_ASSOCIATE_AC_TYPE,
    CLOSED,
    P_DATA_TF_TYPE,
    RawPeer,
    c_store,
    command_set,
    pdata,
    response_status,
    store_request_elements,
)
from dicom_scp.store import ERROR_COMMENT_LENGTH, error_comment
from tests.dicom_scp.helpers import ServerFactory, data_set_offset

CONTEXTS = [(MRImageStorage, [ExplicitVRLittleEndian])]


@pytest.fixture
def thread_deaths() -> Iterator[list[str]]:
    """Exceptions that ended any thread during the test (there must be none)."""
    deaths: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        deaths.append(f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}")

    threading.excepthook = hook
    yield deaths
    threading.excepthook = previous


def _dataset(path: Path) -> tuple[str, bytes]:
    raw = path.read_bytes()
    return str(dcmread(path).SOPInstanceUID), raw[data_set_offset(raw):]


def _wait_idle(server: object, seconds: float = 3.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.active_associations() == 0:  # type: ignore[attr-defined]
            return 0
        time.sleep(0.02)
    return int(server.active_associations())  # type: ignore[attr-defined]


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r.getMessage() for r in caplog.records if r.exc_info], "traceback logged"


MUTATIONS = {
    "no-command-field": lambda e: e.pop(0x0100),
    "no-data-set-type": lambda e: e.pop(0x0800),
    "no-message-id": lambda e: e.pop(0x0110),
    "command-field-one-byte": lambda e: e.update({0x0100: b"\x01"}),
    "unknown-command-field": lambda e: e.update({0x0100: struct.pack("<H", 0x0FF1)}),
    "c-find-on-storage-context": lambda e: e.update({0x0100: struct.pack("<H", 0x0020)}),
    "binary-uid": lambda e: e.update({0x1000: b"\xff\xfe\x00\x80"}),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_broken_command_set_is_answered(
    scp: ServerFactory, mr_files: list[Path], mutation: str,
    caplog: pytest.LogCaptureFixture, thread_deaths: list[str],
) -> None:
    server = scp()
    uid, dataset = _dataset(mr_files[0])
    with RawPeer(server.port) as peer:
        assert peer.associate(CONTEXTS).type == A_ASSOCIATE_AC_TYPE
        elements = store_request_elements(MRImageStorage, uid)
        MUTATIONS[mutation](elements)
        peer.send(pdata(1, 0x03, command_set(elements)))
        peer.send(pdata(1, 0x02, dataset))
        answer = peer.read_pdu(3.0)
        # an A-ABORT, or a DIMSE response with a failure status: never silence
        if answer.type == P_DATA_TF_TYPE:
            status = response_status(answer)
            assert status is not None and status[0] != 0x0000
        else:
            assert answer.type in (A_ABORT_TYPE, CLOSED), answer
    assert _wait_idle(server) == 0, "the association's slot was not freed"
    assert not thread_deaths
    _no_tracebacks(caplog)


@pytest.mark.parametrize("mutation", ["no-message-id", "binary-uid", "n-event-report"])
def test_command_waiting_for_a_data_set_then_another_command_is_aborted(
    scp: ServerFactory, mutation: str, caplog: pytest.LogCaptureFixture,
    thread_deaths: list[str],
) -> None:
    """A C-STORE-RQ whose data set never comes, then a C-ECHO: pynetdicom would wait."""
    server = scp()
    elements = store_request_elements(MRImageStorage, "1.2.3.4")
    if mutation == "no-message-id":
        elements.pop(0x0110)
    elif mutation == "binary-uid":
        elements[0x1000] = b"2\xc4"
    else:
        elements[0x0100] = struct.pack("<H", 0x0100)
    echo = command_set({0x0002: b"1.2.840.10008.1.1\x00", 0x0100: b"\x30\x00",
                        0x0110: b"\x07\x00", 0x0800: b"\x01\x01"})
    with RawPeer(server.port) as peer:
        assert peer.associate(CONTEXTS).type == A_ASSOCIATE_AC_TYPE
        peer.send(pdata(1, 0x03, command_set(elements)))
        peer.send(pdata(1, 0x03, echo))
        assert peer.read_pdu(3.0).type in (A_ABORT_TYPE, CLOSED)
    assert _wait_idle(server) == 0
    assert not thread_deaths
    _no_tracebacks(caplog)


def test_command_set_over_several_fragments_is_stored(
    scp: ServerFactory, mr_files: list[Path]
) -> None:
    server = scp()
    uid, dataset = _dataset(mr_files[1])
    command = command_set(store_request_elements(MRImageStorage, uid))
    with RawPeer(server.port) as peer:
        assert peer.associate(CONTEXTS).type == A_ASSOCIATE_AC_TYPE
        for start in range(0, len(command), 16):
            last = start + 16 >= len(command)
            peer.send(pdata(1, 0x03 if last else 0x01, command[start : start + 16]))
        peer.send(pdata(1, 0x02, dataset))
        assert response_status(peer.read_pdu(3.0)) == (0x0000, None)
    stored = server.spool.path(server.service.index.records[uid].spool_path).read_bytes()
    assert stored[data_set_offset(stored):] == dataset


def test_pdu_longer_than_announced_is_aborted_before_it_is_read(
    scp: ServerFactory, caplog: pytest.LogCaptureFixture, thread_deaths: list[str]
) -> None:
    server = scp()
    with RawPeer(server.port) as peer:
        assert peer.associate(CONTEXTS).type == A_ASSOCIATE_AC_TYPE
        peer.send(struct.pack(">BBL", 0x04, 0, 0x7FFFFFF0) + b"\x00" * 64)
        assert peer.read_pdu(3.0).type == A_ABORT_TYPE
    assert _wait_idle(server) == 0
    assert any("exceeds the limit" in r.getMessage() for r in caplog.records)
    assert not thread_deaths
    _no_tracebacks(caplog)


def test_instance_over_the_size_limit_is_refused_with_a_reason(
    scp: ServerFactory, mr_files: list[Path], thread_deaths: list[str]
) -> None:
    server = scp(max_instance_bytes=1024)
    uid, dataset = _dataset(mr_files[2])
    assert len(dataset) > 1024
    with RawPeer(server.port) as peer:
        assert peer.associate(CONTEXTS).type == A_ASSOCIATE_AC_TYPE
        status, comment = response_status(
            c_store(peer, 1, MRImageStorage, uid, dataset, fragment=1000)) or (None, None)
        assert status == 0xA700
        assert comment is not None and comment.startswith("instance exceeds")
        assert len(comment) <= ERROR_COMMENT_LENGTH
        # the association goes on and ends normally
        assert peer.release().type == 0x06
    assert uid not in server.service.index.records
    assert not thread_deaths


def test_data_fragment_without_a_command_is_aborted(
    scp: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = scp()
    with RawPeer(server.port) as peer:
        assert peer.associate(CONTEXTS).type == A_ASSOCIATE_AC_TYPE
        peer.send(pdata(1, 0x02, b"\x08\x00\x16\x00"))
        assert peer.read_pdu(3.0).type == A_ABORT_TYPE
    assert _wait_idle(server) == 0
    _no_tracebacks(caplog)


@pytest.mark.parametrize(("reason", "detail", "expected"), [
    ("No space left on device", "spool write failed",
     "No space left on device: spool write failed"),
    ("cannot parse data set", "x" * 80, "cannot parse data set: " + "x" * 38 + "..."),
    ("index write failed", None, "index write failed"),
    ("tab\tand\\backslash", None, "tab?and?backslash"),
])
def test_error_comment_leads_with_the_reason(
    reason: str, detail: str | None, expected: str
) -> None:
    comment = error_comment(reason, detail)
    assert comment == expected
    assert len(comment) <= ERROR_COMMENT_LENGTH


def test_error_comment_reason_is_never_cut() -> None:
    with pytest.raises(ValueError, match="longer than 64"):
        error_comment("r" * 65)


def _deflated_bomb(uid: str, inflated_mib: int) -> bytes:
    """A valid MR header followed by ``inflated_mib`` MiB of zeros, raw-deflated (~1000:1)."""
    from pydicom.dataset import Dataset  # noqa: PLC0415
    from pydicom.filebase import DicomBytesIO  # noqa: PLC0415
    from pydicom.filewriter import write_dataset  # noqa: PLC0415

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.1", "1.2.3.2"
    ds.Modality = "MR"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    length = inflated_mib * 2**20
    header = buffer.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(2**20)
    parts = [deflater.compress(header)]
    parts += [deflater.compress(zeros) for _ in range(inflated_mib)]
    return b"".join(parts) + deflater.flush()


def test_deflate_bomb_is_refused_without_inflating_it(
    scp: ServerFactory, thread_deaths: list[str]
) -> None:
    server = scp(max_instance_bytes=8 * 2**20)
    uid = "1.2.3.4.5"
    bomb = _deflated_bomb(uid, 64)
    assert len(bomb) < 2**20
    with RawPeer(server.port) as peer:
        answer = peer.associate([(MRImageStorage, [DeflatedExplicitVRLittleEndian])])
        assert answer.type == A_ASSOCIATE_AC_TYPE
        started = time.monotonic()
        status = response_status(c_store(peer, 1, MRImageStorage, uid, bomb))
        assert time.monotonic() - started < 2.0  # it stopped counting at the limit
        assert status is not None and status[0] == 0xA700
        assert status[1] == "instance exceeds this node's size limit of 8 MiB"
    assert uid not in server.service.index.records
    assert not thread_deaths


def test_deflated_instance_within_the_limit_is_stored(scp: ServerFactory) -> None:
    server = scp(max_instance_bytes=8 * 2**20)
    uid = "1.2.3.4.6"
    data = _deflated_bomb(uid, 1)
    with RawPeer(server.port) as peer:
        peer.associate([(MRImageStorage, [DeflatedExplicitVRLittleEndian])])
        assert response_status(c_store(peer, 1, MRImageStorage, uid, data)) == (0x0000, None)
    assert uid in server.service.index.records


def test_large_data_set_in_many_fragments_is_stored_byte_for_byte(scp: ServerFactory) -> None:
    """Over GATHER_FROM_BYTES a data set is gathered as it arrives; the file is the same."""
    from dicom_scp.reactor.direct import GATHER_FROM_BYTES  # noqa: PLC0415

    server = scp()
    uid = "1.2.3.4.7"
    data = _deflated_bomb(uid, 0)  # a valid header, then Pixel Data of the size below
    header = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)[:-4]
    pixels = bytes(range(256)) * ((GATHER_FROM_BYTES + 2**20) // 256)
    dataset = header + struct.pack("<I", len(pixels)) + pixels
    with RawPeer(server.port) as peer:
        peer.associate(CONTEXTS)
        answer = c_store(peer, 1, MRImageStorage, uid, dataset, fragment=65000)
        assert response_status(answer) == (0x0000, None)
    stored = server.spool.path(server.service.index.records[uid].spool_path).read_bytes()
    assert stored[data_set_offset(stored):] == dataset


def test_full_disk_comment_says_so_first(
    scp: ServerFactory, mr_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool's error names a long path; the sender must still read the cause."""
    import errno  # noqa: PLC0415
    import os  # noqa: PLC0415

    server = scp()

    def full(fd: int, buffers: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("dicom_scp.spool.os.writev", full)
    uid, dataset = _dataset(mr_files[3])
    with RawPeer(server.port) as peer:
        peer.associate(CONTEXTS)
        status = response_status(c_store(peer, 1, MRImageStorage, uid, dataset))
    assert status == (0xA700, "No space left on device: spool write failed")


@pytest.mark.parametrize("pace", ["stalls", "trickles"])
def test_slow_pdu_frees_its_slot_within_the_network_timeout(
    scp: ServerFactory, pace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A PDU announced and then stalled, or sent a byte at a time (slowloris)."""
    server = scp(network_timeout=1.0)
    with RawPeer(server.port) as peer:
        assert peer.associate(CONTEXTS).type == A_ASSOCIATE_AC_TYPE
        peer.send(struct.pack(">BBL", 0x04, 0, 200) + b"\x00" * 10)
        started = time.monotonic()
        if pace == "trickles":
            while time.monotonic() - started < 3.0 and peer.send(b"\x00"):
                time.sleep(0.2)
        assert peer.read_pdu(3.0).type in (A_ABORT_TYPE, CLOSED)
        assert time.monotonic() - started < 3.5
    assert _wait_idle(server) == 0
    _no_tracebacks(caplog)
