"""The Storage SCP as one object with its dependencies passed in.

``StorageServer`` owns nothing global: the spool, the index, the caller policy and the disk
watermark are given to it, so the node, the tests and the benchmark build it the same way::

    server = StorageServer(
        ae_title="DAFNE", port=11112, spool=Spool(data / "spool"), index=SqlInstanceIndex(engine),
        policy=CallerPolicy([AllowedCaller("PACS", "10.0.0.5")]),
        watermark=DiskWatermark(data / "spool", 1024 * 2**20),
    )
    server.start()      # returns once listening
    ...
    server.stop()       # stop accepting, let running associations finish, commit, close
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Iterable
from types import TracebackType

from dicom_scp.admission import AdmissionLimits
from dicom_scp.ae import DEFAULT_MAX_PDU, build_ae, storage_contexts
from dicom_scp.handlers import direct_store_handler, event_handlers
from dicom_scp.policy import CallerPolicy, DiskWatermark
from dicom_scp.reactor import StorageAssociationServer, make_server
from dicom_scp.spool import Spool
from dicom_scp.store import DEFAULT_MAX_INSTANCE_BYTES, InstanceIndex, StoreService

__all__ = ["StorageServer"]

LOGGER = logging.getLogger(__name__)


class StorageServer:
    """C-ECHO and C-STORE SCP writing to a spool and an index.

    Parameters
    ----------
    ae_title : str
        The node's AE title.
    host, port : str, int
        Where to listen; port ``0`` picks a free port (see :attr:`port` after start).
    spool : Spool
        Where received files are written.
    index : InstanceIndex
        Where received instances are recorded (``db.repository.SqlInstanceIndex``).
    policy : CallerPolicy, optional
        The calling-AE allow list; open (accept all, with a warning) by default.
    watermark : DiskWatermark, optional
        Refuse instances with 0xA700 below this much free space.
    sop_classes, transfer_syntaxes : iterable of str, optional
        Override the accepted storage SOP classes and transfer syntaxes.
    max_associations : int
        Concurrent associations before new ones are rejected.
    max_pdu : int
        Maximum PDU length received.
    acse_timeout, dimse_timeout, network_timeout : float
        Seconds, see :func:`dicom_scp.ae.build_ae`.
    ssl_context : ssl.SSLContext, optional
        Accept DICOM over TLS.
    event_driven : bool, optional
        Force (``True``) or avoid (``False``) the event-driven association loops of
        :mod:`dicom_scp.reactor`; by default used when the installed pynetdicom is the
        one they mirror (:mod:`dicom_scp.reactor.contract`).
    index_timeout_s : float
        How long a C-STORE waits for its index commit.
    admission : AdmissionLimits, optional
        How long a connection may take to send its association request (5 s), and how
        many may wait from one address (8) and in all (512).
    max_instance_bytes : int
        Largest instance accepted (as received, and inflated for Deflated Explicit VR
        Little Endian); larger ones are refused with 0xA700. It bounds the memory each
        association can take.
    """

    def __init__(
        self,
        *,
        ae_title: str,
        host: str = "0.0.0.0",
        port: int = 11112,
        spool: Spool,
        index: InstanceIndex,
        policy: CallerPolicy | None = None,
        watermark: DiskWatermark | None = None,
        sop_classes: Iterable[str] | None = None,
        transfer_syntaxes: Iterable[str] | None = None,
        max_associations: int = 16,
        max_pdu: int = DEFAULT_MAX_PDU,
        acse_timeout: float = 30.0,
        dimse_timeout: float = 60.0,
        network_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        event_driven: bool | None = None,
        index_timeout_s: float = 30.0,
        admission: AdmissionLimits | None = None,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self._requested_port = port
        self.spool = spool
        self.policy = policy or CallerPolicy()
        self.admission = admission or AdmissionLimits()
        self.max_instance_bytes = max_instance_bytes
        self.service = StoreService(
            spool=spool,
            index=index,
            watermark=watermark,
            index_timeout_s=index_timeout_s,
            max_instance_bytes=max_instance_bytes,
        )
        self._ae = build_ae(
            ae_title,
            max_associations=max_associations,
            max_pdu=max_pdu,
            acse_timeout=acse_timeout,
            dimse_timeout=dimse_timeout,
            network_timeout=network_timeout,
        )
        self._ae.supported_contexts = storage_contexts(
            sop_classes, list(transfer_syntaxes) if transfer_syntaxes else None
        )
        self._ssl_context = ssl_context
        self._event_driven = event_driven
        self._server: StorageAssociationServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the real one when started with port 0)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        """Whether the server is accepting associations."""
        return self._server is not None

    def start(self) -> None:
        """Claim the spool, recover it after a crash, make free slots and begin listening.

        Raises
        ------
        SpoolError
            If another receiver is using the spool.
        """
        if self._server is not None:
            raise RuntimeError("StorageServer already started")
        self.spool.claim()
        try:
            self.service.recover()
            self.spool.prepare()
            server = make_server(
                self._ae,
                (self.host, self._requested_port),
                evt_handlers=event_handlers(self.service, self.policy),
                ssl_context=self._ssl_context,
                event_driven=self._event_driven,
                store_handler=direct_store_handler(self.service),
                max_dataset_bytes=self.max_instance_bytes,
                admission=self.admission,
                address_check=self.policy.check_address,
            )
        except BaseException:
            self.spool.close()  # gives up the claim: another attempt may take it
            raise
        if self.policy.is_open:
            LOGGER.warning(
                "No calling-AE allow list configured: every caller may store to %s",
                self.ae_title,
            )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="dicom-scp-accept"
        )
        self._thread.daemon = True
        self._thread.start()
        LOGGER.info("DICOM SCP %s listening on %s:%d", self.ae_title, self.host, self.port)

    def active_associations(self) -> int:
        """How many associations are being served right now."""
        return sum(1 for assoc in self._ae.active_associations if assoc.is_acceptor)

    def waiting_connections(self) -> int:
        """How many connections are waiting for their association request (admission)."""
        server = self._server
        return 0 if server is None else server.admission.pending()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, wait up to ``timeout`` for running associations, then abort them.

        Every C-STORE already answered is committed (nothing is answered before).
        """
        server = self._server
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + timeout
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._ae.active_associations:
            if assoc.is_acceptor:
                LOGGER.warning("Aborting association from %s at shutdown", assoc.requestor.ae_title)
                assoc.abort()
        if self._thread is not None:
            self._thread.join(timeout)
        self.service.close()
        self._server = None
        LOGGER.info("DICOM SCP %s stopped", self.ae_title)

    def __enter__(self) -> StorageServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
