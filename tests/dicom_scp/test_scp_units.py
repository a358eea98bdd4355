"""Spool, caller policy, disk watermark and group commit on their own."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dicom_scp.policy import AllowedCaller, CallerPolicy, DiskWatermark
from dicom_scp.spool import Spool, SpoolError
from dicom_scp.store import CommitTimeoutError, GroupCommitter


def test_spool_paths_are_deterministic_and_safe(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relative = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert relative == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5") == relative
    hostile = spool.relative_path("../../etc", "1.2", "x/y")
    assert ".." not in hostile and hostile.count("/") == 2
    assert spool.relative_path("..", "1", "2").split("/")[0] != ".."


def test_spool_write_is_atomic(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relative = spool.relative_path("1.2", "1.2.3", "1.2.3.4")
    size = spool.write(relative, [b"head", memoryview(b"-body" * 1000)])
    assert size == 4 + 5000
    assert spool.path(relative).read_bytes() == b"head" + b"-body" * 1000
    assert spool.exists(relative)
    spool.sync_dirs([relative])
    leftovers = [name for _, _, files in os.walk(spool.root) for name in files if "tmp" in name]
    assert leftovers == []
    assert list(spool.iter_files()) == [relative]


def test_spool_cleans_up_after_crash_and_failure(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relative = spool.relative_path("1.2", "1.2.3", "1.2.3.4")
    spool.write(relative, [b"x"])
    stale = spool.path(relative).parent / ".1.2.3.9.dcm.abc.tmp"
    stale.write_bytes(b"half a file")
    assert spool.recover() == 1
    assert not stale.exists() and spool.path(relative).exists()

    blocked = spool.relative_path("1.2", "1.2.3", "1.2.3.5")
    spool.path(blocked).mkdir()  # a directory where the file should go: rename fails
    with pytest.raises(SpoolError):
        spool.write(blocked, [b"y"])
    leftovers = [name for _, _, files in os.walk(spool.root) for name in files if "tmp" in name]
    assert leftovers == []


def test_spool_recovery_removes_every_unfinished_file(tmp_path: Path) -> None:
    """Temporary files may be unflushed and were never acknowledged: none is trusted."""
    spool = Spool(tmp_path / "spool")
    kept = spool.relative_path("1.2", "1.2.3", "1.2.3.1")
    never_acked = spool.relative_path("1.2", "1.2.3", "1.2.3.3")
    spool.write(kept, [b"complete"])
    folder = spool.path(kept).parent
    (folder / ".1.2.3.1.dcm.aaaa.tmp").write_bytes(b"older duplicate")
    (folder / ".1.2.3.2.dcm.bbbb.tmp").write_bytes(b"indexed, maybe not flushed")
    (folder / ".1.2.3.3.dcm.cccc.tmp").write_bytes(b"half")
    assert spool.recover() == 3
    assert spool.path(kept).read_bytes() == b"complete"
    assert not spool.exists(never_acked)
    assert sorted(spool.iter_files()) == [kept]


def test_staged_file_appears_only_when_finished(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relative = spool.relative_path("1.2", "1.2.3", "1.2.3.1")
    staged = spool.stage(relative, [b"ab", b"cd"])
    assert not spool.exists(relative)
    spool.finish([staged])
    assert spool.path(relative).read_bytes() == b"abcd"
    other = spool.stage(spool.relative_path("1.2", "1.2.3", "1.2.3.2"), [b"x"])
    spool.discard(other)
    assert spool.recover() == 0
    assert sorted(spool.iter_files()) == [relative]


def test_caller_policy() -> None:
    open_policy = CallerPolicy()
    assert open_policy.is_open and open_policy.check("ANYONE", "10.0.0.1") is None
    policy = CallerPolicy(
        [
            AllowedCaller("PACS"),
            AllowedCaller("CT1", "10.1.2.3"),
            AllowedCaller("MR", "10.2.0.0/16"),
            AllowedCaller("LOCAL", "localhost"),
        ]
    )
    assert not policy.is_open
    assert policy.check("PACS", "192.168.1.1") is None
    assert policy.check(" PACS ", None) is None
    assert policy.check("CT1", "10.1.2.3") is None
    assert "not allowed from 10.1.2.4" in (policy.check("CT1", "10.1.2.4") or "")
    assert policy.check("MR", "10.2.77.1") is None
    assert policy.check("MR", "::ffff:10.2.0.9") is None
    assert policy.check("LOCAL", "127.0.0.1") is None
    assert "not in the allow list" in (policy.check("pacs", "1.1.1.1") or "")  # case matters
    with pytest.raises(ValueError, match="cannot be resolved"):
        CallerPolicy([AllowedCaller("X", "no-such-host.invalid")])


def test_disk_watermark(tmp_path: Path) -> None:
    assert DiskWatermark(tmp_path, 0).check(10**15) is None
    assert DiskWatermark(tmp_path, 1).check() is None
    reason = DiskWatermark(tmp_path, 2**62).check()
    assert reason is not None and "below the watermark" in reason
    with pytest.raises(ValueError):
        DiskWatermark(tmp_path, -1)


def test_group_commit_shares_batches_and_isolates_failures() -> None:
    calls: list[list[int]] = []

    def commit(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise RuntimeError("unlucky")
        time.sleep(0.01)  # a slow commit lets the others queue up behind it
        return [item * 2 for item in items]

    committer: GroupCommitter[int, int] = GroupCommitter(commit, max_batch=8)
    results: dict[int, object] = {}

    def worker(item: int) -> None:
        try:
            results[item] = committer.commit(item, timeout=10)
        except RuntimeError as exc:
            results[item] = exc

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert all(results[n] == n * 2 for n in range(24) if n != 13)
    assert isinstance(results[13], RuntimeError)
    assert max(len(call) for call in calls) > 1  # commits were shared
    assert all(len(call) <= 8 for call in calls)


def test_group_commit_timeout() -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(items: list[int]) -> list[int]:
        entered.set()
        release.wait(5)
        return items

    committer: GroupCommitter[int, int] = GroupCommitter(slow)
    leader = threading.Thread(target=committer.commit, args=(1,))
    leader.start()
    assert entered.wait(5)  # the leader's commit is running, so the next one has to queue
    with pytest.raises(CommitTimeoutError):
        committer.commit(2, timeout=0.1)
    release.set()
    leader.join(5)
    assert committer.commit(3, timeout=5) == 3
