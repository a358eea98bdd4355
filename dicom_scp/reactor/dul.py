"""The DUL loop of an accepted association: waits in ``select()``, answers every fault.

Why (measured with py-spy on pynetdicom 3.0.4, see docs/benchmarks.md): pynetdicom's DUL
thread polls, sleeping 1 ms whenever a pass finds nothing to do, so every PDU that
arrives and every response the association thread hands it waits half a millisecond on
average. This loop blocks in ``select()`` on the socket and on a wake-up socket pair that
is written whenever another thread queues a primitive for it.

It also closes the holes through which a broken or hostile peer could leave an
association without an answer (pynetdicom lets an exception from the state machine end
the thread with a traceback on stderr, and the peer waits for a response that never
comes):

* a PDU longer than the node announced (or, before the association, than any
  association request needs) is refused before it is read into memory;
* every exception from decoding or from the state machine becomes one log line and an
  A-ABORT, and the association thread is woken so that it ends and frees its slot;
* broken connections and undecodable PDUs are logged as one line, not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.association import Association
from pynetdicom.dul import _PDU_TYPES, DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

if TYPE_CHECKING:
    from dicom_scp.reactor.direct import DirectDIMSE

__all__ = ["IDLE_WAIT_S", "EventDrivenDUL", "SignalQueue", "peer_name"]

LOGGER = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05
"""Longest a loop blocks without an event; bounds how late timers and kills are noticed."""

CONTROL_PDU_LIMIT = 1024 * 1024
"""Largest PDU other than P-DATA-TF: an association request with 128 contexts and a user
identity is well below 100 KiB; nothing legitimate comes near this."""
UNLIMITED_PDU_LIMIT = 64 * 1024 * 1024
"""Largest P-DATA-TF PDU read when the node announces no maximum length (0)."""

_PDU_HEADER = struct.Struct(">BBL")
_P_DATA_TF = 0x04
_KNOWN_PDU_TYPES = frozenset(code[0] for code in _PDU_TYPES)
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_REASON_NOT_SPECIFIED = 0x00


def peer_name(assoc: Association) -> str:
    """``AE@address`` of the peer, for log lines (the AE title once it is known)."""
    requestor = assoc.requestor
    title = ""
    primitive = requestor.primitive
    if primitive is not None and getattr(primitive, "calling_ae_title", None):
        title = str(primitive.calling_ae_title).strip()
    return f"{title or '?'}@{requestor.address}"


class SignalQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``signal()`` after every ``put`` so a waiting loop wakes up."""

    def __init__(self, signal: Any) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


class EventDrivenDUL(DULServiceProvider):
    """DUL provider that blocks in ``select()`` and turns every fault into an A-ABORT."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.event_queue = SignalQueue(self.wake)
        self.to_provider_queue = SignalQueue(self.wake)
        self._pdata_limit: int | None = None

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
            if getattr(sock, "buffered", False):  # bytes read before the association
                return
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

    def _pdu_limit(self, pdu_type: int) -> int:
        """The longest PDU of ``pdu_type`` that is read (PS3.8 §D.1: Maximum Length).

        P-DATA-TF may be up to twice what the node announced: the bound protects memory,
        and a peer that misreads the maximum by a few bytes still gets its data stored.
        """
        if pdu_type != _P_DATA_TF:
            return CONTROL_PDU_LIMIT
        if self._pdata_limit is None:  # fixed once the association exists: once per association
            announced = int(self.assoc.acceptor.maximum_length or 0)
            self._pdata_limit = (
                max(announced, CONTROL_PDU_LIMIT) * 2 if announced else UNLIMITED_PDU_LIMIT
            )
        return self._pdata_limit

    def _read_pdu_data(self) -> None:
        """Read one PDU and queue its event; P-DATA-TF in Sta6 may go the direct path.

        Each way it can fail is one log line and the state machine's own event: Evt17
        when the connection broke, Evt19 (answered with an A-ABORT) when the PDU is of an
        unknown type, too long or undecodable.
        """
        sock = self.socket
        if sock is None:
            self.event_queue.put("Evt17")
            return
        try:
            header = sock.recv(6)
            if len(header) < 6:
                self.event_queue.put("Evt17")  # closed between PDUs
                return
            pdu_type, _, length = _PDU_HEADER.unpack(header)
            if pdu_type not in _KNOWN_PDU_TYPES:
                self._refuse(f"unknown PDU type 0x{pdu_type:02X}")
                return
            limit = self._pdu_limit(pdu_type)
            if length > limit:
                self._refuse(f"PDU of {length} bytes exceeds the limit of {limit} bytes")
                return
            body = sock.recv(length)
        except (OSError, TimeoutError) as exc:
            LOGGER.warning("Connection from %s broke inside a PDU: %s", peer_name(self.assoc), exc)
            self.event_queue.put("Evt17")
            return
        if len(body) < length:
            LOGGER.warning(
                "Connection from %s closed inside a PDU (%d of %d bytes received)",
                peer_name(self.assoc),
                len(body) + 6,
                length + 6,
            )
            self.event_queue.put("Evt17")
            return
        if (
            pdu_type == _P_DATA_TF
            and self.state_machine.current_state == "Sta6"
            and cast("DirectDIMSE", self.assoc.dimse).receive_pdata(body)
        ):
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:
            self._refuse(f"undecodable PDU: {type(exc).__name__}: {exc}")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _refuse(self, reason: str) -> None:
        LOGGER.warning("Aborting association from %s: %s", peer_name(self.assoc), reason)
        self.event_queue.put("Evt19")

    def run_reactor(self) -> None:
        """The DUL loop; same steps as pynetdicom's, waiting on events instead of sleeping."""
        try:
            self._loop()
        except Exception as exc:
            self._abort(exc)
        finally:
            self._wake_r.close()
            self._wake_w.close()
            if not self.assoc.is_established:
                # the association thread may be waiting for an association request:
                # None tells it there will be none, so it ends and frees its slot now
                self.to_user_queue.put(None)
            signal = getattr(self.assoc, "signal", None)
            if signal is not None:
                signal()

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
            if self._process_recv_primitive():
                pass
            elif self._is_transport_event():
                self._idle_timer.restart()
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False

    def _abort(self, exc: Exception) -> None:
        """Answer an unexpected fault with an A-ABORT: one log line, the slot freed."""
        state = self.state_machine.current_state
        LOGGER.warning(
            "Aborting association from %s: %s: %s (in %s)",
            peer_name(self.assoc),
            type(exc).__name__,
            exc,
            state,
        )
        LOGGER.debug("the fault in detail", exc_info=exc)
        sock = self.socket
        if sock is not None and sock.socket is not None:
            abort_pdu = A_ABORT_RQ()
            abort_pdu.source = _ABORT_SOURCE_PROVIDER
            abort_pdu.reason_diagnostic = _ABORT_REASON_NOT_SPECIFIED
            with contextlib.suppress(OSError):  # the peer is gone: nobody waits for it
                sock.socket.sendall(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True
