"""Event-driven association and upper-layer loops for pynetdicom acceptors.

Why this exists (measured with py-spy on pynetdicom 3.0.4, see docs/benchmarks.md):

* The DUL thread (``DULServiceProvider.run_reactor``) polls: whenever a pass finds nothing
  to do it sleeps 1 ms, so every PDU that arrives, and every response the association
  thread hands it, waits on average half a millisecond (Linux rounds the sleep up to
  ~1.1 ms).
* The association thread (``Association._run_reactor``) sleeps 1 ms before every check of
  the DIMSE message queue, so each received C-STORE waits for that too.
* Each C-STORE costs ~0.6 ms of CPU in pydicom to decode the request's command set and to
  build and encode the response's (twice: once to learn the group length).
* Beyond that, each C-STORE passes through PDU and primitive objects, the state machine, two
  queues, UID validation and the service class before the handler runs, and back the same
  way for the response; in py-spy profiles (GIL held) that bookkeeping was the larger part
  of the receive path's Python time.

With one association a C-STORE is a strict ping-pong, so these waits are paid once per
instance and the process sits half idle. The classes below keep pynetdicom's state
machine, service classes and event handlers, and change only how the two threads wait:
the DUL blocks in ``select()`` on the socket and a wake-up socket pair that is written
whenever the association thread queues a primitive; the association thread blocks on a
``threading.Event`` set whenever the DUL queues a message or primitive for it.

C-STOREs take a direct path: in data transfer (Sta6) the DUL splits each P-DATA-TF PDU
itself, assembles C-STORE requests from the raw fragments, calls the server's
:class:`DirectStoreHandler` on its own thread and writes the hand-coded C-STORE-RSP
(:mod:`dicom_scp.codec`) straight to the socket. Data transfer leaves the state machine in
Sta6 either way, so nothing is skipped but bookkeeping. The path is left for pynetdicom's
whenever something needs its objects: a handler bound to a DIMSE, PDU or data event, a
command that is not a C-STORE-RQ, a context that was not accepted, a malformed PDU.

The hooks used are pynetdicom's own extension points (``AE.make_server(server_class=…,
request_handler=…)``), but the overridden loops mirror private methods of pynetdicom
3.0.x; :func:`is_supported` checks the version, and callers fall back to stock servers
outside it.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Sequence
from copy import deepcopy
from datetime import datetime
from io import BytesIO
from typing import Any, Protocol, cast

import pynetdicom
from pynetdicom import _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import _PDU_TYPES, DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from dicom_scp.ae import set_nodelay
from dicom_scp.codec import (
    StoreRequestCommand,
    decode_command_set,
    decode_store_request,
    encode_command_pdus,
    encode_store_response,
    split_pdata,
)

__all__ = [
    "DirectStoreHandler",
    "EventDrivenAssociation",
    "EventDrivenRequestHandler",
    "EventDrivenServer",
    "is_supported",
    "make_server",
]

LOGGER = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05
"""Longest a loop blocks without an event; bounds how late timers and kills are noticed."""

_PREALLOCATE_LIMIT = 8 * 1024 * 1024
_PDU_HEADER = struct.Struct(">BBL")
_P_DATA_TF = 0x04
_KNOWN_PDU_TYPES = frozenset(code[0] for code in _PDU_TYPES)


_STANDARD_LOGGING_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def is_supported() -> bool:
    """Whether the installed pynetdicom is a version these loops were written against."""
    return pynetdicom.__version__.startswith("3.0.")


class _SignalQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``signal()`` after every ``put`` so a waiting loop wakes up."""

    def __init__(self, signal: Any) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _quickack(sock: socket.socket) -> None:
    """Acknowledge received segments at once instead of after Linux's ~40 ms delay.

    Why: a peer that leaves Nagle's algorithm on (most modalities don't set TCP_NODELAY)
    sends the C-STORE command PDU, then holds back the start of the data set until that
    small segment is acknowledged; with delayed ACKs on our side every instance stalls
    for ~40 ms (~25 images/s). The kernel clears the flag again after a while, so it is
    set before every read; it costs one system call.
    """
    if _TCP_QUICKACK is not None:
        try:  # noqa: SIM105 - hot path, contextlib.suppress costs more
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass


class _FastSocket(AssociationSocket):
    """``AssociationSocket`` whose ``recv`` fills one buffer instead of 4 KiB pieces."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closed the connection)."""
        sock = cast(socket.socket, self.socket)
        _quickack(sock)
        if nr_bytes > _PREALLOCATE_LIMIT:  # don't trust a huge length before data arrives
            return super().recv(nr_bytes)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        try:
            while received < nr_bytes:
                count = sock.recv_into(view[received:], nr_bytes - received)
                if not count:
                    break
                received += count
        finally:
            view.release()
        if received < nr_bytes:
            del buffer[received:]
        return buffer


class _EventDrivenDUL(DULServiceProvider):
    """DUL provider that blocks in ``select()`` instead of sleeping 1 ms between polls."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.event_queue = _SignalQueue(self.wake)
        self.to_provider_queue = _SignalQueue(self.wake)

    def wake(self) -> None:
        """Interrupt the DUL's wait (thread-safe, never blocks).

        The DUL thread itself never waits while it is running, so its own puts (most of
        them: every received PDU becomes an event) need no wake-up system call.
        """
        if threading.get_ident() == self.ident:
            return
        try:  # noqa: SIM105 - hot path, contextlib.suppress costs more
            self._wake_w.send(b"\x00")
        except OSError:  # closed after the loop ended, or the pipe is full: already awake
            pass

    def kill_dul(self) -> None:
        """Stop the loop and wake it so it notices at once."""
        self._kill_thread = True
        self.wake()

    def stop_dul(self) -> bool:
        """Stop the loop if the state machine is idle (Sta1), as pynetdicom's does."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.wake()
        if threading.current_thread() is not self and self.is_alive():
            self.join()
        return True

    def _wait(self) -> None:
        readers: list[Any] = [self._wake_r]
        sock = self.socket
        raw = sock.socket if sock is not None and sock._is_connected else None
        if raw is not None:
            pending = getattr(raw, "pending", None)  # TLS may hold decrypted bytes
            if pending is not None and pending():
                return
            readers.append(raw)
        try:
            ready, _, _ = select.select(readers, [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # the socket was closed under us
            time.sleep(0.001)
            return
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass

    def _read_pdu_data(self) -> None:
        """Read one PDU; in data transfer, offer P-DATA-TF to the direct C-STORE path.

        Outside Sta6, or for any PDU the direct path does not take, this ends as
        pynetdicom's own method does: the PDU decoded and its event queued for the state
        machine, or Evt17/Evt19 with the same log lines for a broken connection or PDU.
        """
        if self.state_machine.current_state != "Sta6":
            super()._read_pdu_data()
            return
        sock = cast(AssociationSocket, self.socket)
        try:
            header = sock.recv(6)
            if len(header) < 6:
                self.event_queue.put("Evt17")  # closed between PDUs
                return
            pdu_type, _, length = _PDU_HEADER.unpack(header)
            if pdu_type not in _KNOWN_PDU_TYPES:
                LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
                self.event_queue.put("Evt19")
                return
            body = sock.recv(length)
        except (OSError, TimeoutError) as exc:
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return
        if len(body) < length:
            LOGGER.error(
                "The received PDU is shorter than expected (%d of %d bytes received)",
                len(body) + 6,
                length + 6,
            )
            self.event_queue.put("Evt17")
            return
        dimse = cast(_DirectDIMSE, self.assoc.dimse)
        if pdu_type == _P_DATA_TF and dimse.receive_pdata(body):
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:
            LOGGER.error("Unable to decode the received PDU data")
            LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def run_reactor(self) -> None:
        """The DUL loop; same steps as pynetdicom's, waiting on events instead of sleeping."""
        try:
            self._loop()
        finally:
            self._wake_r.close()
            self._wake_w.close()
            assoc = self.assoc
            if isinstance(assoc, EventDrivenAssociation):
                assoc.signal()

    def _loop(self) -> None:
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                LOGGER.exception("Exception in the DUL loop, aborting the association")
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                if self.socket is not None and self.socket.socket is not None:
                    self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False


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


_OBSERVED_EVENTS = (
    evt.EVT_DIMSE_RECV,
    evt.EVT_DIMSE_SENT,
    evt.EVT_PDU_RECV,
    evt.EVT_PDU_SENT,
    evt.EVT_DATA_RECV,
)


class _PendingStore:
    """A C-STORE-RQ whose data set fragments are still arriving."""

    __slots__ = ("command", "context_id", "fragments")

    def __init__(self, context_id: int, command: StoreRequestCommand) -> None:
        self.context_id = context_id
        self.command = command
        self.fragments: list[memoryview] = []

    def dataset(self) -> bytes | memoryview:
        """The data set: the received bytes themselves if it came in one fragment."""
        if len(self.fragments) == 1:
            return self.fragments[0]
        return b"".join(self.fragments)


class _DirectDIMSE(DIMSEServiceProvider):
    """DIMSE provider that serves C-STORE requests straight from received PDU bytes."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._store: _PendingStore | None = None

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
        if self._store is None:
            if not self._direct_ok() or not self._start_store(items[0]):
                return False
            self._receive(items, 1)
        else:
            self._receive(items, 0)
        return True

    def _start_store(self, item: tuple[int, memoryview]) -> bool:
        context_id, data = item
        if data[0] & 0x03 != 0x03:  # not a whole command set in one fragment
            return False
        try:
            command = decode_store_request(decode_command_set(data[1:]))
        except ValueError:
            return False  # let pynetdicom judge (and log) what we do not recognise
        if command is None or not command.has_dataset:
            return False
        self._store = _PendingStore(context_id, command)
        return True

    def _receive(self, items: Sequence[tuple[int, memoryview]], index: int) -> None:
        while index < len(items):
            pending = self._store
            if pending is None:  # another message follows a completed C-STORE in one PDU
                if not self._start_store(items[index]):
                    self._receive_with_pynetdicom(items[index:])
                    return
                index += 1
                continue
            context_id, data = items[index]
            index += 1
            if data[0] & 0x01 or context_id != pending.context_id:
                LOGGER.error("Command fragment or context change inside a C-STORE data set")
                self._store = None
                self.dul.event_queue.put("Evt19")
                return
            pending.fragments.append(data[1:])
            if data[0] & 0x02:
                self._store = None
                self._serve(pending)

    def _receive_with_pynetdicom(self, items: Sequence[tuple[int, memoryview]]) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[cid, bytes(data)] for cid, data in items]
        self.receive_primitive(primitive)

    def _serve(self, pending: _PendingStore) -> None:
        assoc = cast(EventDrivenAssociation, self.assoc)
        command = pending.command
        context = assoc._accepted_cx.get(pending.context_id)
        handler = assoc.store_handler
        if handler is None or context is None or assoc._sent_release:
            self._serve_with_pynetdicom(pending)
            return
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
            LOGGER.error("Received an invalid C-STORE request: %s", exc)
            self.dul.event_queue.put("Evt19")
            return
        try:
            self.assoc._serve_request(request, pending.context_id)
        except Exception:
            LOGGER.exception("Unhandled error serving a C-STORE request")

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a C-STORE-RSP as hand-coded PDUs; anything else via pynetdicom."""
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.OffendingElement is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_store_response(
                message_id=cast(int, primitive.MessageIDBeingRespondedTo),
                sop_class_uid=str(primitive.AffectedSOPClassUID or ""),
                sop_instance_uid=str(primitive.AffectedSOPInstanceUID or ""),
                status=cast(int, primitive.Status),
                error_comment=primitive.ErrorComment,
            )
            limit = self.maximum_pdu_size
            if limit == 0 or len(command) + 12 <= limit:
                pdata = P_DATA()
                pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class EventDrivenAssociation(Association):
    """An ``Association`` whose reactor waits on events instead of sleeping 1 ms.

    C-STORE requests are served on the DUL thread as soon as their last fragment arrives
    rather than being queued for the association thread. A C-STORE is a strict
    request/response exchange (pynetdicom negotiates no asynchronous operations window), so
    nothing else can happen on the association meanwhile; what is saved is a wake-up of the
    association thread and another of the DUL thread for the response, per instance, which
    on a loaded machine costs more than the handler itself.
    """

    store_handler: DirectStoreHandler | None = None
    """Serves C-STOREs on the direct path; ``None`` sends them through pynetdicom."""

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        self._activity = threading.Event()
        super().__init__(ae, mode)
        self.dul = _EventDrivenDUL(self)
        self.dul.to_user_queue = _SignalQueue(self.signal)
        self.dimse = _DirectDIMSE(self)
        self.dimse.msg_queue = _SignalQueue(self.signal)
        # the timeout setter configures the DUL's idle timer, so apply it to the new DUL
        self.network_timeout = self.ae.network_timeout

    def signal(self) -> None:
        """Wake the association reactor (something was queued for it)."""
        self._activity.set()

    def kill(self) -> None:
        """Stop the reactor and the DUL (pynetdicom's ``kill``, plus a wake-up)."""
        self._activity.set()
        super().kill()

    def _run_reactor(self) -> None:
        """Serve DIMSE requests until release, abort, DUL exit or network timeout."""
        self._is_paused = False
        busy = True
        while not self._kill:
            if not busy:
                self._activity.wait(IDLE_WAIT_S)
                self._activity.clear()
            busy = False

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                busy = True
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.debug("Association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                LOGGER.debug("Association aborted")
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                self.abort()
                self.kill()
                return


class EventDrivenRequestHandler(RequestHandler):
    """Creates :class:`EventDrivenAssociation` acceptors with TCP_NODELAY sockets."""

    def _create_association(self) -> Association:
        client = cast(socket.socket, self.request)
        set_nodelay(client)
        assoc = EventDrivenAssociation(self.ae, MODE_ACCEPTOR)
        assoc.store_handler = getattr(self.server, "store_handler", None)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"

        assoc.set_socket(_FastSocket(assoc, client_socket=client))

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote

        if not getattr(self.server, "pdu_logging", False):
            # Association.__init__ binds these itself; they format every PDU and message
            for event, handler in _STANDARD_LOGGING_HANDLERS:
                assoc.unbind(event, handler)
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Any, Any]], handlers):
                    assoc.bind(event, handler, args)
        return assoc


class EventDrivenServer(ThreadedAssociationServer):
    """A threaded association server with TCP_NODELAY on its listening socket."""

    daemon_threads = True
    pdu_logging = False
    store_handler: DirectStoreHandler | None = None

    def server_bind(self) -> None:
        """Bind as pynetdicom does, then disable Nagle (accepted sockets inherit it)."""
        super().server_bind()
        set_nodelay(self.socket)

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        if self in self.ae._servers:
            self.ae._servers.remove(self)


def make_server(
    ae: ApplicationEntity,
    address: tuple[str, int],
    *,
    evt_handlers: list[Any],
    ssl_context: Any = None,
    event_driven: bool | None = None,
    pdu_logging: bool = False,
    store_handler: DirectStoreHandler | None = None,
) -> ThreadedAssociationServer:
    """Create (but do not start) an association server for ``ae`` on ``address``.

    Parameters
    ----------
    ae : pynetdicom.ae.ApplicationEntity
        The AE with its supported contexts set.
    address : tuple of (str, int)
        Host and port to listen on; port 0 picks a free port.
    evt_handlers : list
        pynetdicom ``(event, handler[, args])`` tuples.
    ssl_context : ssl.SSLContext, optional
        Wraps accepted sockets in TLS.
    event_driven : bool, optional
        Use the event-driven loops; by default when :func:`is_supported`.
    pdu_logging : bool
        Keep pynetdicom's per-PDU and per-DIMSE debug logging handlers. They format
        every message even when the log level would drop it, so they are off by default
        (and with them on, C-STOREs take pynetdicom's path so that they are logged).
    store_handler : DirectStoreHandler, optional
        Serves C-STOREs on the event-driven loops' direct path. It should do what the
        ``EVT_C_STORE`` handler in ``evt_handlers`` does, which still serves C-STOREs that
        take pynetdicom's path (and all of them on the stock loops).

    Returns
    -------
    pynetdicom.transport.ThreadedAssociationServer
        Call ``serve_forever()`` on a thread, ``shutdown()`` to stop.
    """
    use_fast = is_supported() if event_driven is None else event_driven
    if use_fast:
        server = ae.make_server(
            address,
            evt_handlers=evt_handlers,
            ssl_context=ssl_context,
            server_class=EventDrivenServer,
            request_handler=EventDrivenRequestHandler,
        )
        server.store_handler = store_handler  # read by EventDrivenRequestHandler
    else:
        LOGGER.warning(
            "pynetdicom %s: using its stock polling loops (slower receive path)",
            pynetdicom.__version__,
        )
        server = ae.make_server(
            address,
            evt_handlers=evt_handlers,
            ssl_context=ssl_context,
            server_class=_StockServer,
        )
    if not pdu_logging:
        for event, handler in _STANDARD_LOGGING_HANDLERS:
            server.unbind(event, handler)
    server.pdu_logging = pdu_logging  # read by EventDrivenRequestHandler
    ae._servers.append(server)
    return cast(ThreadedAssociationServer, server)


class _StockServer(ThreadedAssociationServer):
    """pynetdicom's server with TCP_NODELAY on accepted sockets (fallback path)."""

    daemon_threads = True

    def server_bind(self) -> None:
        """Bind as pynetdicom does, then disable Nagle (accepted sockets inherit it)."""
        super().server_bind()
        set_nodelay(self.socket)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection and make sure Nagle is off on it."""
        client, address = super().get_request()
        set_nodelay(client)
        return client, address
