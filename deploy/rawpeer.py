"""A DICOM peer on a raw socket, for sending what no well-behaved implementation sends.

pynetdicom and dcmtk refuse to send broken PDUs, so fuzzing and fault tests speak the
upper layer protocol byte by byte here: a real association request (encoded by
pynetdicom's PDU classes), then whatever bytes the test wants, and it reads the node's
answers PDU by PDU with a timeout, so a test can tell an answer from silence.

Used by the receiver's fault and fuzz tests and by ``bench/memory.py`` and
``bench/instructions.py``; it lives here, beside ``deploy/netns.py``, so that benchmarks
import no test code.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from dicom_scp.codec import decode_command_set

A_ASSOCIATE_RQ_TYPE = 0x01
A_ASSOCIATE_AC_TYPE = 0x02
A_ASSOCIATE_RJ_TYPE = 0x03
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_RELEASE_RP_TYPE = 0x06
A_ABORT_TYPE = 0x07
SILENCE = -1
"""``read_pdu`` found nothing within its timeout (the node did not answer)."""
CLOSED = 0
"""``read_pdu`` found the connection closed."""

_HEADER = struct.Struct(">BBL")


@dataclass(frozen=True)
class Pdu:
    """One PDU read from the node (or ``SILENCE``/``CLOSED`` as its type)."""

    type: int
    body: bytes = b""


def association_request(
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    calling: str = "FUZZ",
    called: str = "DAFNE",
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``(abstract syntax, transfer syntaxes)`` contexts."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    proposed = []
    for number, (abstract, syntaxes) in enumerate(contexts):
        context = build_context(abstract, list(syntaxes))
        context.context_id = 2 * number + 1
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def pdata(context_id: int, control: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU with one presentation data value item."""
    item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return _HEADER.pack(P_DATA_TF_TYPE, 0, len(item)) + item


class RawPeer:
    """A TCP connection to the node that speaks the upper layer protocol by hand.

    Parameters
    ----------
    port : int
        The node's port on ``host``.
    host : str
        The node's address (loopback).
    source : str, optional
        A local address to connect from (``127.0.0.x`` stands for another host).
    timeout : float
        Default seconds to wait for an answer.
    """

    def __init__(
        self, port: int, *, host: str = "127.0.0.1", source: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.accepted: dict[int, str] = {}

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (no release: tests decide what to send)."""
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """Send raw bytes; False if the node already closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def _read_exactly(self, count: int, deadline: float) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(count - len(chunks))
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            chunks += chunk
        return bytes(chunks)

    def read_pdu(self, timeout: float | None = None) -> Pdu:
        """The next PDU from the node, ``CLOSED`` or ``SILENCE`` after ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            header = self._read_exactly(6, deadline)
            if header is None:
                return Pdu(CLOSED)
            pdu_type, _, length = _HEADER.unpack(header)
            body = self._read_exactly(length, deadline)
        except TimeoutError:
            return Pdu(SILENCE)
        except OSError:
            return Pdu(CLOSED)
        if body is None:
            return Pdu(CLOSED)
        return Pdu(pdu_type, body)

    def associate(
        self, contexts: Sequence[tuple[str, Sequence[str]]], *, calling: str = "FUZZ",
        called: str = "DAFNE", max_pdu: int = 16384,
    ) -> Pdu:
        """Send an association request; on A-ASSOCIATE-AC record the accepted contexts."""
        self.send(association_request(contexts, calling=calling, called=called,
                                      max_pdu=max_pdu))
        answer = self.read_pdu()
        if answer.type == A_ASSOCIATE_AC_TYPE:
            accepted = A_ASSOCIATE_AC()
            accepted.decode(_HEADER.pack(answer.type, 0, len(answer.body)) + answer.body)
            for item in accepted.presentation_context:
                if item.result_reason == 0:
                    self.accepted[item.context_id] = str(item.transfer_syntax)
        return answer

    def release(self) -> Pdu:
        """Send A-RELEASE-RQ and return the node's answer."""
        self.send(bytes((A_RELEASE_RQ_TYPE, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
        return self.read_pdu()


def response_status(answer: Pdu) -> tuple[int, str | None] | None:
    """Status and Error Comment of a DIMSE response in a P-DATA-TF, or ``None``."""
    if answer.type != P_DATA_TF_TYPE or len(answer.body) < 6:
        return None
    command = decode_command_set(answer.body[6:])
    status = command.get(0x0900)
    if status is None:
        return None
    comment = command.get(0x0902)
    text = comment.decode("ascii", "replace").strip() if comment else None
    return int.from_bytes(status, "little"), text


def _padded(value: bytes) -> bytes:
    return value + b"\x00" if len(value) % 2 else value


def command_set(elements: dict[int, bytes]) -> bytes:
    """An Implicit VR Little Endian command set of ``{element: raw value}`` in group 0000."""
    body = b"".join(
        struct.pack("<HHI", 0, element, len(value)) + value
        for element, value in sorted(elements.items())
    )
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def store_request_elements(
    sop_class_uid: str, sop_instance_uid: str, message_id: int = 1
) -> dict[int, bytes]:
    """The elements of a well-formed C-STORE-RQ command set (to mutate)."""
    return {
        0x0002: _padded(sop_class_uid.encode()),
        0x0100: struct.pack("<H", 0x0001),
        0x0110: struct.pack("<H", message_id),
        0x0700: struct.pack("<H", 0),
        0x0800: struct.pack("<H", 0x0000),
        0x1000: _padded(sop_instance_uid.encode()),
    }


def c_store(
    peer: RawPeer, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: bytes,
    *, message_id: int = 1, fragment: int = 16000,
) -> Pdu:
    """Send a C-STORE-RQ (command, then the data set in fragments); return the answer."""
    command = command_set(store_request_elements(sop_class_uid, sop_instance_uid, message_id))
    peer.send(pdata(context_id, 0x03, command))
    for start in range(0, max(len(dataset), 1), fragment):
        last = start + fragment >= len(dataset)
        if not peer.send(pdata(context_id, 0x02 if last else 0x00,
                               dataset[start : start + fragment])):
            break
    return peer.read_pdu()
