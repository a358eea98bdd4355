"""The direct C-STORE path: requests served straight from the received PDU bytes.

Why: each C-STORE through pynetdicom passes PDU and primitive objects, the state machine,
two queues, UID validation and the service class before the handler runs, and back the
same way for the response; in py-spy profiles that bookkeeping was the larger part of the
receive path's Python time. In data transfer (Sta6) the DUL hands each P-DATA-TF body to
:class:`DirectDIMSE`, which assembles C-STORE requests from views of the received buffer,
calls the server's :class:`DirectStoreHandler` on the DUL thread and writes the hand-coded
C-STORE-RSP (:mod:`dicom_scp.codec`) straight to the socket. Data transfer leaves the state
machine in Sta6 either way, so nothing is skipped but bookkeeping.

Whatever needs pynetdicom's objects still gets them: a handler bound to a DIMSE, PDU or
data event, a command that is not a C-STORE-RQ, a context that was not accepted.

Memory is bounded whatever a peer sends: a data set larger than the association's
``max_dataset_bytes`` is counted but not kept, and answered with 0xA700 and the reason
(:func:`dicom_scp.store.too_large`) once its last fragment arrives; a command set longer
than :data:`COMMAND_SET_LIMIT` ends the association. Messages that take pynetdicom's path
are held to the same limits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from io import BytesIO
from typing import TYPE_CHECKING, Any, Protocol, cast

from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dicom_scp.codec import (
    StoreRequestCommand,
    decode_command_set,
    decode_store_request,
    encode_command_pdus,
    encode_store_response,
    split_pdata,
)
from dicom_scp.reactor.dul import peer_name
from dicom_scp.store import DEFAULT_MAX_INSTANCE_BYTES, too_large

if TYPE_CHECKING:
    from dicom_scp.reactor.association import EventDrivenAssociation

__all__ = [
    "COMMAND_SET_LIMIT",
    "DirectDIMSE",
    "DirectStoreHandler",
    "MessageTooLargeError",
]

LOGGER = logging.getLogger(__name__)

COMMAND_SET_LIMIT = 64 * 1024
"""Longest command set accepted; a C-STORE-RQ's is about 200 bytes."""

_COMMAND = 0x01
_LAST = 0x02
_OBSERVED_EVENTS = (
    evt.EVT_DIMSE_RECV,
    evt.EVT_DIMSE_SENT,
    evt.EVT_PDU_RECV,
    evt.EVT_PDU_SENT,
    evt.EVT_DATA_RECV,
)


class MessageTooLargeError(Exception):
    """A DIMSE message on pynetdicom's path grew beyond the association's limits."""


class DirectStoreHandler(Protocol):
    """Serves one C-STORE on the direct path; returns the status and an Error Comment.

    Called on the association's DUL thread with the request's command, the transfer
    syntax of its presentation context and the data set as received. It must not raise:
    the response is sent as soon as it returns.
    """

    def __call__(
        self,
        assoc: Association,
        command: StoreRequestCommand,
        transfer_syntax_uid: str,
        dataset: bytes | memoryview,
    ) -> tuple[int, str | None]:
        """Store the data set and say how it went."""
        ...


GATHER_FROM_BYTES = 4 * 1024 * 1024
"""Size from which a data set's fragments are gathered into one growing buffer as they
arrive (below it they are kept as received and joined once at the end: cheaper for the
usual 0.1-1 MiB image than growing a buffer fragment by fragment)."""


class _PendingStore:
    """A C-STORE-RQ whose data set fragments are still arriving (kept up to a limit).

    A data set that comes in one fragment stays a view of the received PDU (no copy); small
    ones are joined once complete. From :data:`GATHER_FROM_BYTES` on, fragments are gathered
    into one buffer as they arrive, so each PDU's buffer is freed at once and a large data
    set is never held twice: a ``bytearray`` of that size grows in place (``mremap``).
    """

    __slots__ = ("buffer", "command", "context_id", "fragments", "limit", "size")

    def __init__(self, context_id: int, command: StoreRequestCommand, limit: int) -> None:
        self.context_id = context_id
        self.command = command
        self.limit = limit
        self.fragments: list[memoryview] = []
        self.buffer: bytearray | None = None
        self.size = 0

    def add(self, fragment: memoryview) -> None:
        """Keep ``fragment``, or only count it once the data set is over the limit."""
        self.size += len(fragment)
        if self.size > self.limit:
            self.fragments.clear()
            self.buffer = None
        elif self.buffer is not None:
            self.buffer += fragment
        elif self.size < GATHER_FROM_BYTES:
            self.fragments.append(fragment)
        else:
            self.buffer = bytearray().join([*self.fragments, fragment])
            self.fragments.clear()

    @property
    def too_large(self) -> bool:
        """Whether the data set exceeded the limit (its bytes were not kept)."""
        return self.size > self.limit

    def dataset(self) -> bytes | memoryview:
        """The data set: the received bytes themselves if it came in one fragment."""
        if self.buffer is not None:
            return memoryview(self.buffer)
        if len(self.fragments) == 1:
            return self.fragments[0]
        return b"".join(self.fragments)


class DirectDIMSE(DIMSEServiceProvider):
    """DIMSE provider that serves C-STORE requests straight from received PDU bytes."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._store: _PendingStore | None = None
        self._command: tuple[int, list[bytes]] | None = None  # context, fragments so far
        self._message_bytes = 0

    @property
    def _limit(self) -> int:
        return int(getattr(self.assoc, "max_dataset_bytes", DEFAULT_MAX_INSTANCE_BYTES))

    def _direct_ok(self) -> bool:
        # pynetdicom may be half-way through a message of its own, or someone may want its
        # message and PDU objects: then it sees everything, as it would without us
        return (
            self.message is None
            and not _config.STORE_RECV_CHUNKED_DATASET
            and not any(self.assoc.get_handlers(event) for event in _OBSERVED_EVENTS)
        )

    def receive_pdata(self, body: bytearray) -> bool:
        """Take the body of a received P-DATA-TF PDU if it belongs to a C-STORE.

        Returns ``False``, having changed nothing, if pynetdicom should handle the PDU.
        """
        try:
            items = split_pdata(body)
        except ValueError:
            return False  # pynetdicom decodes it again and aborts with its usual log line
        if not items:
            return False
        first = items[0][1]
        if (
            self._store is None
            and self._command is None
            and (not self._direct_ok() or not first or not first[0] & _COMMAND)
        ):
            return False
        self._receive(items)
        return True

    def _receive(self, items: Sequence[tuple[int, memoryview]]) -> None:
        for index, (context_id, data) in enumerate(items):
            if not data:
                self._protocol_error("empty presentation data value")
                return
            control = data[0]
            pending = self._store
            if pending is not None:
                if control & _COMMAND or context_id != pending.context_id:
                    self._protocol_error("command or context change inside a C-STORE data set")
                    return
                pending.add(data[1:])
                if control & _LAST:
                    self._store = None
                    self._serve(pending)
                continue
            if not control & _COMMAND:
                self._protocol_error("data set fragment without a command")
                return
            if control & _LAST and self._command is None:  # a whole command: the usual case
                if not self._start(context_id, data[1:], items, index):
                    return
                continue
            if not self._collect_command(context_id, data):
                return
            if control & _LAST:
                _, fragments = cast(tuple[int, list[bytes]], self._command)
                self._command = None  # _collect_command checked every fragment's context
                if not self._start(context_id, b"".join(fragments), items, index):
                    return

    def _collect_command(self, context_id: int, data: memoryview) -> bool:
        if self._command is None:
            self._command = (context_id, [])
        elif self._command[0] != context_id:
            self._protocol_error("context change inside a command set")
            return False
        fragments = self._command[1]
        fragments.append(bytes(data[1:]))
        if sum(len(fragment) for fragment in fragments) > COMMAND_SET_LIMIT:
            self._protocol_error(f"command set longer than {COMMAND_SET_LIMIT} bytes")
            return False
        return True

    def _start(
        self,
        context_id: int,
        command_set: bytes | memoryview,
        items: Sequence[tuple[int, memoryview]],
        index: int,
    ) -> bool:
        """A command set is complete: start a direct C-STORE or hand over to pynetdicom.

        Returns whether the direct path goes on with the rest of ``items``.
        """
        try:
            command = decode_store_request(decode_command_set(command_set))
        except ValueError:
            command = None  # pynetdicom judges (and logs) what we do not recognise
        if command is None or not command.has_dataset:
            rest = [(context_id, b"\x03" + bytes(command_set))]
            rest += [(cid, bytes(data)) for cid, data in items[index + 1 :]]
            self._receive_with_pynetdicom(rest)
            return False
        self._store = _PendingStore(context_id, command, self._limit)
        return True

    def _protocol_error(self, reason: str) -> None:
        LOGGER.warning("Aborting association from %s: %s", peer_name(self.assoc), reason)
        self._store = None
        self._command = None
        self.dul.event_queue.put("Evt19")

    def _receive_with_pynetdicom(self, items: Sequence[tuple[int, bytes]]) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[cid, data] for cid, data in items]
        self.receive_primitive(primitive)

    def _serve(self, pending: _PendingStore) -> None:
        assoc = cast("EventDrivenAssociation", self.assoc)
        command = pending.command
        context = assoc._accepted_cx.get(pending.context_id)
        handler = assoc.store_handler
        if pending.too_large:
            refusal = too_large(pending.size, pending.limit)
            LOGGER.warning(
                "C-STORE %s from %s refused with 0x%04X: %s",
                command.sop_instance_uid,
                peer_name(assoc),
                refusal.status,
                refusal.reason,
            )
            status, comment = refusal.status, refusal.error_comment
        elif handler is None or context is None or assoc._sent_release:
            self._serve_with_pynetdicom(pending)
            return
        else:
            status, comment = handler(
                assoc, command, str(context.transfer_syntax[0]), pending.dataset()
            )
        response = encode_store_response(
            message_id=command.message_id,
            sop_class_uid=command.sop_class_uid,
            sop_instance_uid=command.sop_instance_uid,
            status=status,
            error_comment=comment,
        )
        socket_ = self.dul.socket
        if socket_ is not None:
            socket_.send(encode_command_pdus(pending.context_id, response, self.maximum_pdu_size))

    def _serve_with_pynetdicom(self, pending: _PendingStore) -> None:
        """Serve through pynetdicom's service class and handlers (its checks and logs)."""
        command = pending.command
        try:
            request = C_STORE()
            request.MessageID = command.message_id
            request.AffectedSOPClassUID = command.sop_class_uid
            request.AffectedSOPInstanceUID = command.sop_instance_uid
            request.Priority = command.priority if command.priority in (0, 1, 2) else 0
            if command.move_originator_ae:
                request.MoveOriginatorApplicationEntityTitle = command.move_originator_ae
            if command.move_originator_id is not None:
                request.MoveOriginatorMessageID = command.move_originator_id
            request.DataSet = BytesIO(pending.dataset())
            request._context_id = pending.context_id
        except Exception as exc:
            self._protocol_error(f"invalid C-STORE request: {exc}")
            return
        try:
            self.assoc._serve_request(request, pending.context_id)
        except Exception as exc:
            LOGGER.warning(
                "C-STORE %s from %s failed in pynetdicom: %s: %s",
                command.sop_instance_uid,
                peer_name(self.assoc),
                type(exc).__name__,
                exc,
            )
            self.assoc.abort()

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Pynetdicom's message assembly, bounded, with one log line per fault.

        Raises
        ------
        MessageTooLargeError
            If the message grows beyond the data set or command set limit; the DUL
            answers with an A-ABORT.
        """
        if self.message is None:
            self.message = DIMSEMessage()
            self._message_bytes = 0
        items = primitive.presentation_data_value_list
        if self.message.context_id is not None and any(  # its command set is complete
            data and data[0] & _COMMAND for _, data in items
        ):
            # pynetdicom would append it to the finished command set and wait for ever
            self._protocol_error("a command fragment where the data set was expected")
            self.message = None
            return
        self._message_bytes += sum(len(data) for _, data in items)
        if self._message_bytes > self._limit + COMMAND_SET_LIMIT:
            raise MessageTooLargeError(
                f"DIMSE message exceeds the size limit of {self._limit // 2**20} MiB"
            )
        if not self.message.decode_msg(primitive, self.assoc):
            return
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": self.message})
        context_id = cast(int, self.message.context_id)
        message, self.message = self.message, None
        try:
            d_primitive = message.message_to_primitive()
        except Exception as exc:
            self._protocol_error(f"invalid DIMSE message: {type(exc).__name__}: {exc}")
            return
        if isinstance(d_primitive, C_CANCEL):
            if len(self.cancel_req) < 10:  # pynetdicom keeps at most ten
                self.cancel_req[cast(int, d_primitive.MessageIDBeingRespondedTo)] = d_primitive
            return
        # pynetdicom serves N-EVENT-REPORT requests on a thread of their own; this SCP
        # accepts no context for them, so they are refused in order like anything else
        self.msg_queue.put((context_id, d_primitive))

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a C-STORE-RSP as hand-coded PDUs; anything else via pynetdicom."""
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.OffendingElement is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            try:
                command = encode_store_response(
                    message_id=cast(int, primitive.MessageIDBeingRespondedTo),
                    sop_class_uid=str(primitive.AffectedSOPClassUID or ""),
                    sop_instance_uid=str(primitive.AffectedSOPInstanceUID or ""),
                    status=cast(int, primitive.Status),
                    error_comment=primitive.ErrorComment,
                )
            except (UnicodeError, ValueError) as exc:  # UIDs no response can carry
                LOGGER.warning(
                    "Aborting association from %s: cannot answer its C-STORE: %s",
                    peer_name(self.assoc),
                    exc,
                )
                self.assoc.abort()
                return
            limit = self.maximum_pdu_size
            if limit == 0 or len(command) + 12 <= limit:
                pdata = P_DATA()
                pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)
