"""Our Storage SCP and SCU against dcmtk (echoscu, storescu, storescp) on loopback."""

from __future__ import annotations

import logging
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from db.node_models import Instance, Series
from db.session import session_scope
from dicom_scp.policy import AllowedCaller, CallerPolicy, DiskWatermark
from dicom_scp.sender import AssociationError, echo, parse_destination, send_files
from tests.dicom_scp.helpers import (
    MemoryIndex,
    ServerFactory,
    data_set_offset,
    dcmtk,
    make_mr,
)


def _stored(server_spool: Path) -> list[Path]:
    return sorted(path for path in server_spool.rglob("*.dcm") if not path.name.startswith("."))


def test_echoscu(scp: ServerFactory) -> None:
    server = scp()
    result = dcmtk("echoscu", "-aec", "DAFNE", "127.0.0.1", str(server.port))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("event_driven", [True, False], ids=["event-driven", "stock-pynetdicom"])
def test_storescu_lands_in_spool_and_index(
    scp: ServerFactory, mr_files: list[Path], event_driven: bool
) -> None:
    index = MemoryIndex()
    server = scp(index=index, event_driven=event_driven)
    result = dcmtk(
        "storescu",
        "-aet",
        "MODALITY",
        "-aec",
        "DAFNE",
        "127.0.0.1",
        str(server.port),
        *map(str, mr_files),
    )
    assert result.returncode == 0, result.stderr
    stored = _stored(server.spool.root)
    assert len(stored) == len(mr_files)
    assert set(index.records) == {path.stem for path in mr_files}
    for path in mr_files:
        record = index.records[path.stem]
        assert record.calling_ae == "MODALITY" and record.called_ae == "DAFNE"
        assert record.peer_address == "127.0.0.1"
        assert record.modality == "MR" and record.body_part_examined == "LEG"
        kept = server.spool.path(record.spool_path)
        original = dcmread(path)
        copy = dcmread(kept)
        # byte-for-byte the same data set, with conformant File Meta Information
        assert copy.PixelData == original.PixelData
        assert copy.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert copy.file_meta.SourceApplicationEntityTitle == "MODALITY"
        assert record.size_bytes == kept.stat().st_size


def _data_set(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information."""
    raw = path.read_bytes()
    return raw[data_set_offset(raw) :]


@pytest.mark.parametrize("event_driven", [True, False], ids=["event-driven", "stock-pynetdicom"])
def test_data_sets_split_over_many_pdus_are_stored_byte_for_byte(
    scp: ServerFactory, tmp_path: Path, event_driven: bool
) -> None:
    # 32 KiB of pixels per image in PDUs of at most 4 KiB: every data set arrives in pieces
    files = make_mr(tmp_path / "big", 3, size=128)
    index = MemoryIndex()
    server = scp(index=index, max_pdu=4096, event_driven=event_driven)
    result = dcmtk("storescu", "-aec", "DAFNE", "127.0.0.1", str(server.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    for path in files:
        record = index.records[path.stem]
        assert _data_set(server.spool.path(record.spool_path)) == _data_set(path)


def _timed_storescu(port: int, files: list[Path], *, nodelay: bool) -> float:
    """Seconds dcmtk's storescu takes to send ``files``, with or without TCP_NODELAY."""
    start = time.perf_counter()
    result = dcmtk("storescu", "-aec", "DAFNE", "127.0.0.1", str(port), *map(str, files),
                   timeout=30, nodelay=nodelay)
    assert result.returncode == 0, result.stderr
    return time.perf_counter() - start


def test_sender_with_nagle_on_is_not_stalled(scp: ServerFactory, tmp_path: Path) -> None:
    # Most modalities leave Nagle on; without TCP_QUICKACK on our side every instance
    # would wait ~40 ms for our delayed ACK (40 files: 1.6 s or more on top). Compared with
    # the same push under TCP_NODELAY in the same run, so a slow disk cannot fail it.
    server = scp()
    with_nodelay = _timed_storescu(server.port, make_mr(tmp_path / "nodelay", 40), nodelay=True)
    with_nagle = _timed_storescu(server.port, make_mr(tmp_path / "nagle", 40), nodelay=False)
    assert len(_stored(server.spool.root)) == 80
    assert with_nagle < with_nodelay + 0.8, (
        f"40 instances took {with_nagle:.2f} s with Nagle, {with_nodelay:.2f} s without")


def test_duplicate_is_answered_success_and_stored_once(
    scp: ServerFactory, mr_files: list[Path]
) -> None:
    server = scp(index="sqlite")
    args = ("-aec", "DAFNE", "127.0.0.1", str(server.port), *map(str, mr_files[:4]))
    assert dcmtk("storescu", *args).returncode == 0
    first = {path: path.stat().st_mtime_ns for path in _stored(server.spool.root)}
    again = dcmtk("storescu", *args)
    assert again.returncode == 0, again.stderr  # every duplicate answered success
    assert {p: p.stat().st_mtime_ns for p in _stored(server.spool.root)} == first  # not rewritten
    index = server.service.index
    with session_scope(index.engine) as session:  # type: ignore[attr-defined]
        assert len(session.scalars(select(Instance)).all()) == 4
        assert session.scalars(select(Series)).one().num_instances == 4


def test_unknown_calling_ae_is_rejected_with_reason(
    scp: ServerFactory, mr_files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    policy = CallerPolicy([AllowedCaller("PACS"), AllowedCaller("SCANNER", "10.9.9.0/24")])
    server = scp(policy=policy)
    port = str(server.port)
    with caplog.at_level(logging.WARNING, logger="dicom_scp"):
        refused = dcmtk(
            "storescu", "-aet", "INTRUDER", "-aec", "DAFNE", "127.0.0.1", port, str(mr_files[0])
        )
        wrong_host = dcmtk("echoscu", "-aet", "SCANNER", "-aec", "DAFNE", "127.0.0.1", port)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert wrong_host.returncode != 0
    assert "'INTRUDER' is not in the allow list" in caplog.text
    assert "'SCANNER' is not allowed from 127.0.0.1" in caplog.text
    assert _stored(server.spool.root) == []
    allowed = dcmtk(
        "storescu", "-aet", "PACS", "-aec", "DAFNE", "127.0.0.1", port, str(mr_files[0])
    )
    assert allowed.returncode == 0, allowed.stderr
    assert len(_stored(server.spool.root)) == 1


def _rt_plan(folder: Path) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"  # RT Plan
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "RTPLAN"
    path = folder / "rtplan.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_unsupported_sop_class_has_no_context(
    scp: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = scp()
    with caplog.at_level(logging.WARNING, logger="dicom_scp"):
        result = dcmtk(  # -R: propose only what the file needs, as a focused sender does
            "storescu", "-R", "-aec", "DAFNE", "127.0.0.1", str(server.port),
            str(_rt_plan(tmp_path)),
        )
        # logged on the association's thread, which may finish after storescu exits
        deadline = time.monotonic() + 5
        while "refused RT Plan" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert result.returncode != 0
    assert "no acceptable presentation contexts" in (result.stdout + result.stderr).lower()
    assert "refused RT Plan Storage (not accepted by this node)" in caplog.text
    assert _stored(server.spool.root) == []


def test_watermark_refuses_with_a700(
    scp: ServerFactory, mr_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = scp(watermark=DiskWatermark(tmp_path, 2**62))
    with caplog.at_level(logging.WARNING, logger="dicom_scp"):
        result = dcmtk("storescu", "-aec", "DAFNE", "127.0.0.1", str(server.port), str(mr_files[0]))
    assert result.returncode != 0
    assert "refused with 0xA700: free disk space" in caplog.text
    assert _stored(server.spool.root) == []


def test_eight_concurrent_associations(scp: ServerFactory, tmp_path: Path) -> None:
    server = scp(index="sqlite")
    groups = [make_mr(tmp_path / f"group{n}", 6) for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda group: dcmtk(
                    "storescu",
                    "-aec",
                    "DAFNE",
                    "127.0.0.1",
                    str(server.port),
                    *map(str, group),
                ),
                groups,
            )
        )
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    assert len(_stored(server.spool.root)) == 48
    index = server.service.index
    with session_scope(index.engine) as session:  # type: ignore[attr-defined]
        assert len(session.scalars(select(Instance)).all()) == 48
        assert sorted(s.num_instances for s in session.scalars(select(Series))) == [6] * 8


def test_sender_delivers_to_storescp(storescp: tuple[int, Path], mr_files: list[Path]) -> None:
    port, folder = storescp
    assert echo(f"PACS@127.0.0.1:{port}") == 0
    results = send_files(mr_files[:5], parse_destination(f"PACS@127.0.0.1:{port}"))
    assert [r.status for r in results] == [0] * 5
    assert all(r.ok and r.error is None for r in results)
    received = {dcmread(path).SOPInstanceUID for path in folder.iterdir()}
    assert received == {path.stem for path in mr_files[:5]}


def test_sender_reports_each_file(scp: ServerFactory, mr_files: list[Path], tmp_path: Path) -> None:
    server = scp()
    junk = tmp_path / "not-dicom.dcm"
    junk.write_bytes(b"hello")
    results = send_files(
        [mr_files[0], junk, _rt_plan(tmp_path), mr_files[1]], f"DAFNE@127.0.0.1:{server.port}"
    )
    assert results[0].ok and results[3].ok
    assert results[1].status is None and "cannot read" in (results[1].error or "")
    assert results[2].status is None and "presentation context" in (results[2].error or "")
    assert len(_stored(server.spool.root)) == 2


def test_sender_errors_without_association(scp: ServerFactory) -> None:
    server = scp(policy=CallerPolicy([AllowedCaller("ONLYME")]))
    with pytest.raises(AssociationError, match="rejected"):
        echo(f"DAFNE@127.0.0.1:{server.port}", calling_ae="SOMEONE")
    with pytest.raises(AssociationError):
        echo("DAFNE@127.0.0.1:1", timeout=2)
    with pytest.raises(ValueError):
        parse_destination("no-port@host")


def test_stop_waits_for_running_associations(scp: ServerFactory, tmp_path: Path) -> None:
    server = scp()
    files = make_mr(tmp_path / "many", 200)  # long enough a push to catch it running
    sender = subprocess.Popen(
        ["/usr/bin/storescu", "-aec", "DAFNE", "127.0.0.1", str(server.port), *map(str, files)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not server.active_associations() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.active_associations() == 1
    server.stop(timeout=20)
    assert sender.wait(20) == 0  # the running association finished normally
    assert len(_stored(server.spool.root)) == 200
    refused = dcmtk("echoscu", "-aec", "DAFNE", "127.0.0.1", str(server.port), timeout=10)
    assert refused.returncode != 0
