"""The association thread of an accepted association, and how it is created.

Why: pynetdicom's association thread sleeps 1 ms before every check of its DIMSE message
queue, so each request it serves waits for that too. This one blocks on a
``threading.Event`` set whenever the DUL queues a message or primitive for it. C-STOREs
are served on the DUL thread (:mod:`dicom_scp.reactor.direct`) as soon as their last
fragment arrives: a C-STORE is a strict request/response exchange (pynetdicom negotiates
no asynchronous operations window), so nothing else can happen on the association
meanwhile, and a wake-up of each thread per instance is saved.

Whatever goes wrong on this thread (a handler, the ACSE negotiation of a strange request)
ends it with one log line and an A-ABORT, so the peer has its answer and the slot is free.
"""

from __future__ import annotations

import logging
import socket
import threading
from copy import deepcopy
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler

from dicom_scp.ae import set_nodelay
from dicom_scp.reactor.direct import DirectDIMSE, DirectStoreHandler
from dicom_scp.reactor.dul import IDLE_WAIT_S, EventDrivenDUL, SignalQueue, peer_name
from dicom_scp.reactor.sockets import TunedSocket
from dicom_scp.store import DEFAULT_MAX_INSTANCE_BYTES

__all__ = [
    "STANDARD_LOGGING_HANDLERS",
    "EventDrivenAssociation",
    "EventDrivenRequestHandler",
]

LOGGER = logging.getLogger(__name__)

STANDARD_LOGGING_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)
"""pynetdicom's per-PDU and per-DIMSE debug logging: it formats every message even when
the log level drops it, so the node unbinds it unless PDU logging is asked for."""


class EventDrivenAssociation(Association):
    """An ``Association`` whose reactor waits on events instead of sleeping 1 ms."""

    store_handler: DirectStoreHandler | None = None
    """Serves C-STOREs on the direct path; ``None`` sends them through pynetdicom."""
    max_dataset_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    """Largest data set one C-STORE may bring (refused with 0xA700 beyond)."""

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        self._activity = threading.Event()
        super().__init__(ae, mode)
        self.dul = EventDrivenDUL(self)
        self.dul.to_user_queue = SignalQueue(self.signal)
        self.dimse = DirectDIMSE(self)
        self.dimse.msg_queue = SignalQueue(self.signal)
        # the timeout setter configures the DUL's idle timer, so apply it to the new DUL
        self.network_timeout = self.ae.network_timeout

    def signal(self) -> None:
        """Wake the association reactor (something was queued for it)."""
        self._activity.set()

    def kill(self) -> None:
        """Stop the reactor and the DUL (pynetdicom's ``kill``, plus a wake-up)."""
        self._activity.set()
        super().kill()

    def run_reactor(self) -> None:
        """Pynetdicom's acceptor reactor; an exception ends it with an A-ABORT."""
        try:
            super().run_reactor()
        except Exception as exc:
            LOGGER.warning(
                "Aborting association from %s: %s: %s",
                peer_name(self),
                type(exc).__name__,
                exc,
            )
            LOGGER.debug("the fault in detail", exc_info=exc)
            try:
                self.abort()
            except Exception as abort_exc:  # the connection is already gone
                LOGGER.debug("abort after a fault failed: %s", abort_exc)
            self.kill()
            sock = self.dul.socket
            if self._server is not None and sock is not None and sock.socket is not None:
                self._server.shutdown_request(sock.socket)

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """Serve C-ECHO and C-STORE through pynetdicom; abort on anything it cannot answer.

        Why: pynetdicom logs a traceback and sends nothing for a request without a
        Message ID, or for a C-FIND sent on a storage context; the peer would wait for a
        response until its own timeout. Those get an A-ABORT and one log line instead.
        """
        reason = _unanswerable(msg, self._accepted_cx.get(context_id))
        if reason is not None and not self._sent_release:
            LOGGER.warning("Aborting association from %s: %s", peer_name(self), reason)
            self.abort()
            return
        super()._serve_request(msg, context_id)

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
                LOGGER.warning("Network timeout reached on association from %s", peer_name(self))
                self.abort()
                self.kill()
                return


def _unanswerable(msg: Any, context: Any) -> str | None:
    """Why pynetdicom's service classes could not answer ``msg`` (``None``: they can)."""
    name = getattr(msg, "msg_type", type(msg).__name__).replace("_", "-")
    if not isinstance(msg, C_ECHO | C_STORE):
        return f"{name} requests are not served by this node (C-ECHO and C-STORE only)"
    if not msg.is_valid_request:
        return f"{name} request without the parameters a response needs (Message ID)"
    if context is None:
        return None  # pynetdicom aborts for an unaccepted context itself
    verification = str(context.abstract_syntax) == Verification
    if isinstance(msg, C_ECHO) != verification:
        return f"{name} request on a {'Verification' if verification else 'Storage'} context"
    return None


class EventDrivenRequestHandler(RequestHandler):
    """Creates acceptors of the server's ``association_class`` with tuned sockets.

    :class:`EventDrivenAssociation` by default; pynetdicom's own ``Association`` when the
    installed pynetdicom differs from what its loops mirror.

    The server may have read the A-ASSOCIATE-RQ already (admission waits for it before an
    association exists); ``server.take_received(sock)`` hands those bytes over.
    """

    def _create_association(self) -> Association:
        client = cast(socket.socket, self.request)
        set_nodelay(client)
        server: Any = self.server
        association_class = getattr(server, "association_class", EventDrivenAssociation)
        assoc = association_class(self.ae, MODE_ACCEPTOR)
        assoc.store_handler = getattr(server, "store_handler", None)
        assoc.max_dataset_bytes = getattr(server, "max_dataset_bytes", DEFAULT_MAX_INSTANCE_BYTES)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"

        take = getattr(server, "take_received", None)
        received = take(client) if take is not None else b""
        assoc.set_socket(TunedSocket(assoc, client, received, timeout=self.ae.network_timeout))

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote

        if not getattr(server, "pdu_logging", False):
            # Association.__init__ binds these itself; they format every PDU and message
            for event, handler in STANDARD_LOGGING_HANDLERS:
                assoc.unbind(event, handler)
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Any, Any]], handlers):
                    assoc.bind(event, handler, args)
        return assoc
