"""The association server: admission at accept, then an association thread per request.

Connections go through :class:`dicom_scp.admission.Admission` before pynetdicom sees
them, so idle or stalled connections never hold an association thread or slot. A
connection whose association request has arrived becomes an
:class:`~dicom_scp.reactor.association.EventDrivenAssociation` (or, if the installed
pynetdicom differs from what those loops mirror, pynetdicom's own ``Association``).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from typing import Any, cast

import pynetdicom
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from dicom_scp.admission import AddressCheck, Admission, AdmissionLimits
from dicom_scp.ae import set_nodelay
from dicom_scp.reactor.association import (
    STANDARD_LOGGING_HANDLERS,
    EventDrivenAssociation,
    EventDrivenRequestHandler,
)
from dicom_scp.reactor.contract import differences, is_supported
from dicom_scp.reactor.direct import DirectStoreHandler
from dicom_scp.store import DEFAULT_MAX_INSTANCE_BYTES

__all__ = ["StorageAssociationServer", "make_server"]

LOGGER = logging.getLogger(__name__)


class StorageAssociationServer(ThreadedAssociationServer):
    """A threaded association server with admission and TCP_NODELAY sockets."""

    daemon_threads = True
    request_queue_size = socket.SOMAXCONN
    """Listen backlog. socketserver's default of 5 drops the SYN of a real caller that
    arrives during a burst of connections (a scanner), delaying it by a second or more."""
    pdu_logging = False
    store_handler: DirectStoreHandler | None = None
    max_dataset_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    association_class: type[Association] = EventDrivenAssociation
    admission: Admission

    def server_bind(self) -> None:
        """Bind as pynetdicom does, then disable Nagle (accepted sockets inherit it)."""
        super().server_bind()
        set_nodelay(self.socket)
        self._received: dict[int, bytes] = {}
        self._received_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; TLS is left to admission (its handshake never blocks)."""
        client, address = cast(socket.socket, self.socket).accept()
        set_nodelay(client)
        return client, address

    def service_actions(self) -> None:
        """Do nothing between polls of the listening socket.

        pynetdicom's server runs a full ``gc.collect()`` every 60 polls (every 12 s at the
        receiver's 0.2 s poll) so that finished association threads are freed sooner. A full
        collection walks the whole heap holding the GIL, which stalls every association
        and everything else in the process meanwhile (0.3-0.4 s for a node-sized heap; in
        the improvement run's driver, with four receivers as PACS, a fifth of a core).
        Python's generational collector frees those threads anyway, and
        ``ae.active_associations`` lists live threads only.
        """

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to admission instead of starting its thread now."""
        self.admission.admit(request, client_address)

    def start_association(
        self, sock: socket.socket, address: tuple[str, int], received: bytes
    ) -> None:
        """Start the association thread for a connection admission let through."""
        with self._received_lock:
            self._received[id(sock)] = received
        socketserver.ThreadingMixIn.process_request(self, sock, address)

    def take_received(self, sock: socket.socket) -> bytes:
        """The bytes admission read from ``sock`` (once; empty if none)."""
        with self._received_lock:
            return self._received.pop(id(sock), b"")

    def shutdown(self) -> None:
        """Stop accepting, close waiting connections and the listening socket."""
        socketserver.BaseServer.shutdown(self)
        self.admission.stop()
        self.server_close()
        if self in self.ae._servers:
            self.ae._servers.remove(self)


def make_server(
    ae: ApplicationEntity,
    address: tuple[str, int],
    *,
    evt_handlers: list[Any],
    ssl_context: ssl.SSLContext | None = None,
    event_driven: bool | None = None,
    pdu_logging: bool = False,
    store_handler: DirectStoreHandler | None = None,
    max_dataset_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    admission: AdmissionLimits | None = None,
    address_check: AddressCheck | None = None,
) -> StorageAssociationServer:
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
        Wraps accepted connections in TLS (handshake during admission).
    event_driven : bool, optional
        Use the event-driven loops; by default when the installed pynetdicom is the one
        they mirror (:func:`dicom_scp.reactor.contract.is_supported`).
    pdu_logging : bool
        Keep pynetdicom's per-PDU and per-DIMSE debug logging handlers. They format
        every message even when the log level would drop it, so they are off by default
        (and with them on, C-STOREs take pynetdicom's path so that they are logged).
    store_handler : DirectStoreHandler, optional
        Serves C-STOREs on the event-driven loops' direct path. It should do what the
        ``EVT_C_STORE`` handler in ``evt_handlers`` does, which still serves C-STOREs that
        take pynetdicom's path (and all of them on the stock loops).
    max_dataset_bytes : int
        Largest data set of one C-STORE (0xA700 beyond, memory bounded).
    admission : AdmissionLimits, optional
        How long and how many connections may wait for their association request.
    address_check : callable, optional
        Refuses connections from some addresses at accept.

    Returns
    -------
    StorageAssociationServer
        Call ``serve_forever()`` on a thread, ``shutdown()`` to stop.
    """
    use_fast = is_supported() if event_driven is None else event_driven
    if not use_fast and event_driven is None:
        LOGGER.warning(
            "pynetdicom %s differs from what the fast receive path mirrors (%s); using "
            "its stock loops (slower receive path)",
            pynetdicom.__version__,
            "; ".join(differences()),
        )
    server = cast(
        StorageAssociationServer,
        ae.make_server(
            address,
            evt_handlers=evt_handlers,
            server_class=StorageAssociationServer,
            request_handler=EventDrivenRequestHandler,
        ),
    )
    server.association_class = EventDrivenAssociation if use_fast else Association
    server.store_handler = store_handler if use_fast else None
    server.max_dataset_bytes = max_dataset_bytes
    server.pdu_logging = pdu_logging  # read by EventDrivenRequestHandler
    server.admission = Admission(
        hand_over=server.start_association,
        limits=admission,
        address_check=address_check,
        ssl_context=ssl_context,
    )
    server.admission.start()
    if not pdu_logging:
        for event, handler in STANDARD_LOGGING_HANDLERS:
            server.unbind(event, handler)
    ae._servers.append(server)
    return server
