"""Caller policy, disk watermark and group commit on their own."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dicom_scp.policy import AllowedCaller, CallerPolicy, DiskWatermark
from dicom_scp.store import CommitTimeoutError, GroupCommitter


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
