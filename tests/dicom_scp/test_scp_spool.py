"""The spool on its own, and the receiver's recovery from a crash at every step.

A crash is simulated by leaving the spool as the process would leave it at that moment
(slots written or not, final names linked or not, the index committed or not) and then
starting a new ``StoreService`` on the same directory, as the node does at start.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_scp.spool import SLOTS_FREE, Spool, SpoolError
from dicom_scp.store import StoreRequest, StoreService
from tests.dicom_scp.helpers import MemoryIndex, ServerFactory, data_set_offset


def _slots(spool: Spool) -> list[Path]:
    return sorted((spool.root / ".incoming").iterdir())


def test_spool_paths_are_deterministic_and_safe(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relative = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert relative == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5") == relative
    hostile = spool.relative_path("../../etc", "1.2", "x/y")
    assert ".." not in hostile and hostile.count("/") == 2
    assert spool.relative_path("..", "1", "2").split("/")[0] != ".."


def test_write_is_complete_and_leaves_no_slot_holding_data(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relative = spool.relative_path("1.2", "1.2.3", "1.2.3.4")
    size = spool.write(relative, [b"head", memoryview(b"-body" * 1000)])
    assert size == 4 + 5000
    assert spool.path(relative).read_bytes() == b"head" + b"-body" * 1000
    assert spool.exists(relative)
    assert spool.leftovers() == []
    assert list(spool.iter_files()) == [relative]  # slots are not instances
    spool.close()


def test_staged_file_has_its_final_name_only_when_finished(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relative = spool.relative_path("1.2", "1.2.3", "1.2.3.1")
    staged = spool.stage(relative, [b"ab", b"cd"])
    assert staged.crc32 == zlib.crc32(b"abcd") and staged.size == 4
    assert not spool.exists(relative)
    spool.finish([staged])
    assert spool.path(relative).read_bytes() == b"abcd"
    other = spool.stage(spool.relative_path("1.2", "1.2.3", "1.2.3.2"), [b"x"])
    spool.discard(other)
    spool.flush()
    assert spool.leftovers() == []
    assert sorted(spool.iter_files()) == [relative]
    spool.close()


def test_slots_are_made_ahead_durably_and_kept_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.stage(spool.relative_path("1.2", "1.2.3", "1.2.3.1"), [b"x"])
    assert not first.slot_is_durable  # nothing made ahead yet: made on demand, flushed
    spool.finish([first])
    assert spool.leftovers() == []
    spool.prepare()
    spool.close()
    made = _slots(spool)
    assert len(made) >= SLOTS_FREE and all(slot.stat().st_size == 0 for slot in made)
    again = Spool(tmp_path / "spool")
    staged = again.stage(again.relative_path("1.2", "1.2.3", "1.2.3.2"), [b"y"])
    assert staged.slot_is_durable and Path(staged.slot) in made
    again.discard(staged)
    again.close()


def test_a_failed_write_leaves_no_slot_behind(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    blocked = spool.relative_path("1.2", "1.2.3", "1.2.3.5")
    spool.path(blocked).mkdir(parents=True)  # a directory where the file should go
    with pytest.raises(SpoolError):
        spool.write(blocked, [b"y"])
    assert spool.leftovers() == []
    spool.close()


def test_legacy_temporary_files_are_removed(tmp_path: Path) -> None:
    """Spools of earlier versions renamed flushed temporary files: none was acknowledged."""
    spool = Spool(tmp_path / "spool")
    kept = spool.relative_path("1.2", "1.2.3", "1.2.3.1")
    spool.write(kept, [b"complete"])
    folder = spool.path(kept).parent
    (folder / ".1.2.3.2.dcm.bbbb.tmp").write_bytes(b"maybe not flushed")
    (folder / ".1.2.3.3.dcm.cccc.tmp").write_bytes(b"half")
    assert spool.recover() == 2
    assert spool.path(kept).read_bytes() == b"complete"
    assert sorted(spool.iter_files()) == [kept]
    spool.close()


# -- crash recovery through the store service ---------------------------------------------


def _request(path: Path) -> StoreRequest:
    raw = path.read_bytes()
    dataset = raw[data_set_offset(raw) :]
    ds = dcmread(path, stop_before_pixels=True)
    return StoreRequest(
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        dataset=dataset,
        calling_ae="MODALITY",
    )


def _received_without_flushing_names(
    root: Path, index: MemoryIndex, files: list[Path]
) -> list[str]:
    """Store ``files`` (each acknowledged), then 'crash' before any directory fsync.

    What the crash may lose is then lost on purpose: the final names, which only the
    keeper's directory fsync would have made durable. Returns the final paths.
    """
    spool = Spool(root)
    spool.prepare()
    service = StoreService(spool=spool, index=index)
    spool.flush = lambda: None  # type: ignore[method-assign]
    spool._sync_linked = lambda linked: None  # type: ignore[method-assign]
    finals = []
    for path in files:
        assert service.store(_request(path)).ok
        record = index.records[path.stem]
        finals.append(record.spool_path)
        spool.path(record.spool_path).unlink()  # the link did not reach the disk
    return finals


def test_acknowledged_files_whose_names_were_lost_are_completed(
    tmp_path: Path, mr_files: list[Path]
) -> None:
    index = MemoryIndex()
    finals = _received_without_flushing_names(tmp_path / "spool", index, mr_files[:3])
    restarted = StoreService(spool=Spool(tmp_path / "spool"), index=index)
    recovery = restarted.recover()
    assert (recovery.completed, recovery.discarded) == (3, 0)
    for path, relative in zip(mr_files[:3], finals, strict=True):
        copy = dcmread(restarted.spool.path(relative))
        assert copy.PixelData == dcmread(path).PixelData
    assert restarted.spool.leftovers() == []
    restarted.close()


def test_slots_of_files_whose_names_survived_are_freed(
    tmp_path: Path, mr_files: list[Path]
) -> None:
    index = MemoryIndex()
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    spool._sync_linked = lambda linked: None  # type: ignore[method-assign]
    service = StoreService(spool=spool, index=index)
    assert service.store(_request(mr_files[0])).ok  # linked; slot name still there
    restarted = StoreService(spool=Spool(tmp_path / "spool"), index=index)
    assert restarted.recover().completed == 1
    relative = index.records[mr_files[0].stem].spool_path
    assert restarted.spool.exists(relative) and restarted.spool.leftovers() == []
    restarted.close()


def test_partial_or_unindexed_slots_are_discarded(
    tmp_path: Path, mr_files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    index = MemoryIndex()
    _received_without_flushing_names(tmp_path / "spool", index, mr_files[:2])
    slots = Spool(tmp_path / "spool").leftovers()
    assert len(slots) == 2
    # the first: indexed, but its flush never finished (half the bytes reached the disk)
    indexed_but_partial = dcmread(slots[0], stop_before_pixels=True).SOPInstanceUID
    os.truncate(slots[0], slots[0].stat().st_size // 2)
    # the second: flushed, but the crash came before its index commit
    del index.records[dcmread(slots[1], stop_before_pixels=True).SOPInstanceUID]
    # a third: the crash came while its first bytes were being written
    (tmp_path / "spool" / ".incoming" / "0123.slot").write_bytes(b"\x00" * 100)

    restarted = StoreService(spool=Spool(tmp_path / "spool"), index=index)
    with caplog.at_level(logging.WARNING, logger="dicom_scp"):
        recovery = restarted.recover()
    assert (recovery.completed, recovery.discarded) == (0, 3)
    assert f"SOP Instance {indexed_but_partial} is indexed but" in caplog.text
    assert list(restarted.spool.iter_files()) == []
    assert restarted.spool.leftovers() == []
    # the sender still has them and sends again: stored anew under the same names
    for path in mr_files[:2]:
        assert restarted.store(_request(path)).ok
    assert len(list(restarted.spool.iter_files())) == 2
    restarted.close()


def test_a_slot_that_differs_from_its_index_record_is_not_trusted(
    tmp_path: Path, mr_files: list[Path]
) -> None:
    index = MemoryIndex()
    _received_without_flushing_names(tmp_path / "spool", index, mr_files[:1])
    slot = Spool(tmp_path / "spool").leftovers()[0]
    data = bytearray(slot.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte never written: only the CRC-32 tells
    slot.write_bytes(bytes(data))
    restarted = StoreService(spool=Spool(tmp_path / "spool"), index=index)
    assert restarted.recover().discarded == 1
    assert list(restarted.spool.iter_files()) == []
    restarted.close()


def test_keeper_flushes_final_names_and_frees_slots_by_itself(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    relative = spool.relative_path("1.2", "1.2.3", "1.2.3.1")
    staged = spool.stage(relative, [b"data"])
    assert staged.slot_is_durable
    spool.finish([staged])
    assert spool.leftovers() == [Path(staged.slot)]  # reachable by its slot until flushed
    for _ in range(100):  # the keeper's interval is 0.2 s
        if not spool.leftovers():
            break
        time.sleep(0.05)
    assert spool.leftovers() == []
    assert spool.path(relative).read_bytes() == b"data"
    spool.close()


def test_a_spool_serves_one_receiver_at_a_time(scp: ServerFactory, tmp_path: Path) -> None:
    # a second node started on the same data folder must not recover (delete) the first
    # one's files in flight, nor share its free slots
    first = scp(spool=Spool(tmp_path / "shared"))
    with pytest.raises(SpoolError, match=rf"in use by another receiver \(process {os.getpid()}\)"):
        scp(spool=Spool(tmp_path / "shared"))
    first.stop()
    second = scp(spool=Spool(tmp_path / "shared"))
    assert second.running
