"""Storage SCU and Verification SCU: send files to a peer, report each file's status.

The outbox (retries, back-off, which destination) is built on top of :func:`send_files` by
the node; this module does one association per call and reports what happened to every
file, so the caller can decide what to retry. TCP_NODELAY is set on the socket as soon as
it connects (before the A-ASSOCIATE-RQ is sent).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom._globals import DEFAULT_MAX_LENGTH
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_scp.ae import build_ae, requested_contexts, set_nodelay

__all__ = [
    "AssociationError",
    "Destination",
    "SendResult",
    "echo",
    "parse_destination",
    "send_files",
]

LOGGER = logging.getLogger(__name__)

_SUCCESS_OR_WARNING = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_SOP_CLASS_NOT_SUPPORTED = 0x0122
_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


class AssociationError(ConnectionError):
    """No association could be made (refused connection, rejection, abort, timeout)."""


@dataclass(frozen=True)
class Destination:
    """A peer AE: title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """Parse ``AE@host:port`` (IPv6 hosts in brackets: ``AE@[::1]:104``).

    Raises
    ------
    ValueError
        If ``text`` is not of that form or the port is out of range.
    """
    match = _DESTINATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not of the form AE@host:port")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range in {text!r}")
    return Destination(match["ae"].strip(), match["host"].strip("[]"), port)


@dataclass(frozen=True)
class SendResult:
    """What happened to one file."""

    path: Path
    sop_instance_uid: str | None
    status: int | None
    """The DIMSE status from the peer; ``None`` if the file was not sent at all."""
    error: str | None = None
    """Why it failed: the peer's Error Comment, or a local reason."""

    @property
    def ok(self) -> bool:
        """True if the peer stored it (success or a warning status)."""
        return self.status in _SUCCESS_OR_WARNING

    @property
    def permanent(self) -> bool:
        """True if the peer refused this file in a way that resending it cannot change.

        Those are "SOP Class not supported" (0x0122), "Data Set does not match SOP Class"
        (0xA9xx) and "Cannot understand" (0xCxxx): the same bytes get the same answer, so
        the file is given up at once, visibly, instead of after hours of back-off. "Out of
        resources" (0xA7xx), processing failures (0x0110) and lost associations stay
        transient: PACS may recover from them by itself.
        """
        status = self.status
        if status is None:
            return False
        return (status == _SOP_CLASS_NOT_SUPPORTED or 0xA900 <= status <= 0xA9FF
                or 0xC000 <= status <= 0xCFFF)


def _nodelay(event: Event) -> None:
    socket = event.assoc.dul.socket
    set_nodelay(socket.socket if socket is not None else None)


def _make_ae(calling_ae: str, timeout: float) -> AE:
    # As SCU the node only receives responses: pynetdicom's default PDU size is plenty.
    return build_ae(calling_ae, max_pdu=DEFAULT_MAX_LENGTH, acse_timeout=timeout,
                    dimse_timeout=timeout, network_timeout=timeout, connection_timeout=timeout)


def _leave_responses_to_the_caller(assoc: Association) -> None:
    """Keep pynetdicom's association thread from taking the response to our request.

    Why: that thread also takes messages off the DIMSE queue, to serve requests a peer
    sends on our association (the C-STOREs of a C-GET; this module sends none). Before
    ``send_c_store`` waits for its response it pauses the thread, but the pause has a
    window: the thread may have passed its checkpoint while still flagged as paused, and
    if it is descheduled there until the response arrives it takes the response and
    drops it. The sender then waits out the DIMSE timeout (30 s), aborts and sends the
    rest again. Seen under load: in the multi-hospital run (one process sending to eight
    nodes, some 170 threads) associations stalled so several times a generation, each
    right after an instance the node had stored.

    Only that thread takes messages without blocking (every ``send_*`` method blocks), so
    its takes now find nothing and every message waits for the caller.
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return take(block=True) if block else (None, None)

    dimse.get_msg = get_msg  # type: ignore[method-assign]


def _associate(
    ae: AE, destination: Destination, contexts: Sequence[object] | None = None
) -> Association:
    assoc = ae.associate(
        destination.host,
        destination.port,
        contexts=contexts,  # type: ignore[arg-type]
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
    )
    if assoc.is_established:
        _leave_responses_to_the_caller(assoc)
        return assoc
    if assoc.is_rejected:
        reason = "association rejected"
        detail = getattr(assoc.acceptor.primitive, "reason_str", None)
        if detail:
            reason = f"association rejected: {detail}"
    elif assoc.is_aborted:
        reason = "association aborted"
    else:
        reason = "no association (connection refused or timed out)"
    raise AssociationError(f"{destination}: {reason}")


def echo(
    destination: Destination | str, *, calling_ae: str = "DAFNE", timeout: float = 10.0
) -> int:
    """Send a C-ECHO to ``destination``; return the status (``0`` is success).

    Raises
    ------
    AssociationError
        If no association could be made or no response came back.
    """
    if isinstance(destination, str):
        destination = parse_destination(destination)
    ae = _make_ae(calling_ae, timeout)
    assoc = _associate(ae, destination, [build_context(Verification)])
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        raise AssociationError(f"{destination}: no C-ECHO response")
    return int(status.Status)


def _file_identity(path: Path) -> tuple[str, str, str]:
    meta = read_file_meta_info(path)
    return (
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
    )


def _status_of(response: Dataset) -> tuple[int | None, str | None]:
    if "Status" not in response:
        return None, "no response (timeout or association lost)"
    status = int(response.Status)
    comment = response.get("ErrorComment")
    if status in _SUCCESS_OR_WARNING:
        return status, str(comment) if comment else None
    return status, str(comment) if comment else f"refused with status 0x{status:04X}"


def send_files(
    paths: Iterable[Path | str],
    destination: Destination | str,
    *,
    calling_ae: str = "DAFNE",
    timeout: float = 30.0,
) -> list[SendResult]:
    """Send DICOM files to ``destination`` over one association; one result per file.

    Each file is sent in its own transfer syntax (a presentation context is proposed per
    SOP class and transfer syntax found in the files). A file that cannot be read or has
    no accepted context fails alone; the association carries on.

    Parameters
    ----------
    paths : iterable of path
        Part 10 files.
    destination : Destination or str
        The peer, or ``AE@host:port``.
    calling_ae : str
        Our AE title.
    timeout : float
        Seconds for connection, association and each response.

    Raises
    ------
    AssociationError
        If no association could be made; nothing was sent.
    """
    if isinstance(destination, str):
        destination = parse_destination(destination)
    files = [Path(path) for path in paths]
    results: dict[int, SendResult] = {}
    identities: dict[int, tuple[str, str, str]] = {}
    for number, path in enumerate(files):
        try:
            identities[number] = _file_identity(path)
        except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
            results[number] = SendResult(path, None, None, f"cannot read file: {exc}")
    if not identities:
        return [results[number] for number in range(len(files))]

    ae = _make_ae(calling_ae, timeout)
    contexts = requested_contexts(
        (sop_class, syntax) for sop_class, _, syntax in identities.values()
    )
    assoc = _associate(ae, destination, contexts)
    try:
        for number, (_sop_class, sop_instance, _syntax) in identities.items():
            path = files[number]
            if not assoc.is_established:
                results[number] = SendResult(path, sop_instance, None, "association lost")
                continue
            try:
                dataset = dcmread(path)
                response = assoc.send_c_store(dataset)
            except (ValueError, OSError, InvalidDicomError) as exc:
                # e.g. "No presentation context for …" when the peer rejected the context
                results[number] = SendResult(path, sop_instance, None, str(exc))
                continue
            status, error = _status_of(response)
            results[number] = SendResult(path, sop_instance, status, error)
            if status is not None and status not in _SUCCESS_OR_WARNING:
                LOGGER.warning("%s refused %s: %s", destination, path.name, error)
    finally:
        if assoc.is_established:
            assoc.release()
    return [results[number] for number in range(len(files))]
