"""The sender keeps the response to its own request when its process is busy.

pynetdicom's association thread pauses itself before ``send_c_store`` waits for a
response, but a thread descheduled right after its pause checkpoint still looks paused and
then takes the response off the queue itself; the sender waits out its DIMSE timeout.
These tests hold that thread exactly there (as a loaded process does now and then) and
send to dcmtk's storescp.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom.association import Association

from dicom_scp import sender
from dicom_scp.ae import build_ae, requested_contexts
from dicom_scp.sender import parse_destination, send_files

REACTOR_AWAY_S = 0.2
"""How long the association thread stays away after passing its checkpoint."""
CALLER_AWAY_S = 0.5
"""How long the caller's thread stays away between sending a request and taking its
response: longer than the association thread, so the response waits in the queue."""


class PreemptedCheckpoint(threading.Event):
    """The association thread's pause checkpoint; passing it costs the thread the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.preempted = threading.Event()
        self.set()  # the association is running

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        if passed:
            self.preempted.set()
            time.sleep(REACTOR_AWAY_S)
        return passed


def preempt(assoc: Association) -> None:
    """Make both threads lose the CPU where the race is; return once the association
    thread has passed its checkpoint (so it still looks paused) and is away."""
    checkpoint = PreemptedCheckpoint()
    assoc._reactor_checkpoint = checkpoint
    messages = assoc.dimse.msg_queue
    take = messages.get

    def get(block: bool = True, timeout: float | None = None) -> Any:
        if block:
            time.sleep(CALLER_AWAY_S)
        return take(block, timeout)

    messages.get = get  # type: ignore[method-assign]
    assert checkpoint.preempted.wait(5)


def test_pynetdicom_alone_loses_the_response(
    storescp: tuple[int, Path], mr_files: list[Path]
) -> None:
    """The race as pynetdicom has it: the reason for the sender's guard."""
    port, _ = storescp
    ae = build_ae("DAFNE", acse_timeout=5, dimse_timeout=1.5, network_timeout=5,
                  connection_timeout=5)
    dataset = dcmread(mr_files[0])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS",
                         contexts=requested_contexts([(dataset.SOPClassUID,
                                                       dataset.file_meta.TransferSyntaxUID)]))
    assert assoc.is_established
    try:
        preempt(assoc)
        started = time.monotonic()
        response = assoc.send_c_store(dataset)
        assert "Status" not in response  # no response reached the caller
        assert time.monotonic() - started >= 1.0
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def test_sender_gets_every_response_while_preempted(
    storescp: tuple[int, Path], mr_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, folder = storescp
    associate = sender._associate

    def associate_then_preempt(*args: Any, **kwargs: Any) -> Association:
        assoc = associate(*args, **kwargs)
        preempt(assoc)
        return assoc

    monkeypatch.setattr(sender, "_associate", associate_then_preempt)
    started = time.monotonic()
    results = send_files(mr_files[:3], parse_destination(f"PACS@127.0.0.1:{port}"), timeout=3)
    assert [r.status for r in results] == [0, 0, 0], results
    assert time.monotonic() - started < 3  # no response was waited for until the timeout
    received = {dcmread(path).SOPInstanceUID for path in folder.iterdir()}
    assert received == {path.stem for path in mr_files[:3]}
