"""Admission: accepted connections wait here, without a thread or a slot, for their request.

Why: pynetdicom starts an association thread for every TCP connection at accept, and that
thread counts against the association limit while it waits up to the ACSE timeout for an
A-ASSOCIATE-RQ. Sixteen idle connections (a vulnerability scanner, a half-open firewall)
therefore locked every real caller out for half a minute at a time. Here a connection
costs only a file descriptor and a few bytes until its whole association request has
arrived; only then does it get an association thread (and a slot). Connections that send
nothing, or not an association request, within ``request_timeout_s`` are closed, and so are
the oldest waiting ones when too many wait, from one address or in all.

TLS handshakes run here too, non-blocking, so a peer that stalls mid-handshake holds up
nobody. Everything that ends a connection here is one log line.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Admission", "AdmissionLimits"]

LOGGER = logging.getLogger(__name__)

ASSOCIATION_REQUEST_LIMIT = 256 * 1024
"""Longest A-ASSOCIATE-RQ PDU accepted: 128 contexts with 15 transfer syntaxes each and a
user identity need less than 100 KiB. It bounds what waiting connections can hold in
memory: 512 x 256 KiB = 128 MiB at the very worst, 2 MiB from one address."""

_A_ASSOCIATE_RQ = 0x01
_A_ABORT = 0x07
_PDU_HEADER = struct.Struct(">BBL")
_READ_SIZE = 65536
_TICK_S = 0.25

HandOver = Callable[[socket.socket, tuple[str, int], bytes], None]
"""Called with a connection whose association request has arrived, and the bytes read."""
AddressCheck = Callable[[str], str | None]
"""Returns why connections from an address are refused at accept, or ``None``."""


def _abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (PS3.8 §9.3.8) with ``reason``."""
    return bytes((_A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, reason))


_UNRECOGNISED_PDU = 0x01
_UNEXPECTED_PDU = 0x02
_INVALID_PARAMETER = 0x06


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """How long and how many connections may wait for their association request.

    Parameters
    ----------
    request_timeout_s : float
        Seconds from accept until the whole A-ASSOCIATE-RQ must have arrived.
    max_pending_per_address : int
        Connections one address may have waiting; the oldest is closed beyond.
    max_pending : int
        Connections waiting in all; the oldest is closed beyond.
    """

    request_timeout_s: float = 5.0
    max_pending_per_address: int = 8
    max_pending: int = 512

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        if self.max_pending_per_address < 1 or self.max_pending < 1:
            raise ValueError("max_pending_per_address and max_pending must be at least 1")


@dataclass(eq=False, slots=True)
class _Waiting:
    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    timeout: float | None
    handshaken: bool
    received: bytearray = field(default_factory=bytearray)

    @property
    def host(self) -> str:
        return self.address[0]

    def describe(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


class Admission:
    """Holds accepted connections until their association request has arrived.

    Parameters
    ----------
    hand_over : callable
        Called (on the admission thread) with each connection whose A-ASSOCIATE-RQ is
        complete, its peer address and the bytes read so far; it starts the association.
    limits : AdmissionLimits
        Timeout and caps.
    address_check : callable, optional
        Refuses addresses at accept (the allow list, where it names addresses).
    ssl_context : ssl.SSLContext, optional
        Wraps each connection in TLS; the handshake happens here.
    """

    def __init__(
        self,
        *,
        hand_over: HandOver,
        limits: AdmissionLimits | None = None,
        address_check: AddressCheck | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._hand_over = hand_over
        self.limits = limits or AdmissionLimits()
        self._address_check = address_check
        self._ssl_context = ssl_context
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._arrivals: list[_Waiting] = []
        self._waiting: dict[socket.socket, _Waiting] = {}  # in order of arrival
        self._per_host: Counter[str] = Counter()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the admission thread."""
        self._thread = threading.Thread(target=self._run, name="dicom-scp-admission", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close every waiting connection and stop the thread."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        for entry in [*self._waiting.values(), *self._arrivals]:
            self._close(entry.sock)
        self._waiting.clear()
        self._arrivals.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def pending(self) -> int:
        """How many connections are waiting for their association request."""
        with self._lock:
            return len(self._waiting) + len(self._arrivals)

    def admit(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Take a just-accepted connection (called on the accept thread; never blocks)."""
        host = str(address[0])
        if self._address_check is not None:
            reason = self._address_check(host)
            if reason is not None:
                LOGGER.warning("Closed connection from %s at accept: %s", host, reason)
                self._close(sock)
                return
        timeout = sock.gettimeout()
        handshaken = self._ssl_context is None
        try:
            if self._ssl_context is not None:
                sock = self._ssl_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            sock.setblocking(False)
        except (OSError, ValueError) as exc:
            LOGGER.warning("Closed connection from %s at accept: %s", host, exc)
            self._close(sock)
            return
        entry = _Waiting(
            sock=sock,
            address=(host, int(address[1])),
            deadline=time.monotonic() + self.limits.request_timeout_s,
            timeout=timeout,
            handshaken=handshaken,
        )
        with self._lock:
            self._arrivals.append(entry)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (already awake) or closed (stopping)
            self._wake_w.send(b"\x00")

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._round()
            except Exception:  # a bug here must not stop admission of everyone else
                LOGGER.exception("Admission round failed; continuing")
                time.sleep(0.05)

    def _round(self) -> None:
        timeout = _TICK_S
        if self._waiting:  # in order of arrival, so the first is the first to expire
            first = next(iter(self._waiting.values())).deadline
            timeout = max(0.0, min(timeout, first - time.monotonic()))
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self._wake_r:
                self._drain_wake()
                continue
            entry = self._waiting.get(key.fileobj)  # type: ignore[call-overload]
            if entry is not None:
                self._service(entry)
        self._take_arrivals()
        self._expire()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _take_arrivals(self) -> None:
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
        for entry in arrivals:
            self._make_room(entry.host)
            self._waiting[entry.sock] = entry
            self._per_host[entry.host] += 1
            self._selector.register(entry.sock, selectors.EVENT_READ)
            self._service(entry)  # bytes may be there already

    def _make_room(self, host: str) -> None:
        """Close the oldest waiting connections so that one more from ``host`` fits."""
        limits = self.limits
        if self._per_host[host] >= limits.max_pending_per_address:
            oldest = next(entry for entry in self._waiting.values() if entry.host == host)
            self._drop(oldest, f"more than {limits.max_pending_per_address} connections "
                               f"from {host} waiting; closed the oldest")
        if len(self._waiting) >= limits.max_pending:
            oldest = next(iter(self._waiting.values()))
            self._drop(oldest, f"more than {limits.max_pending} connections waiting; "
                               "closed the oldest")

    def _expire(self) -> None:
        now = time.monotonic()
        expired = []
        for entry in self._waiting.values():
            if entry.deadline > now:
                break
            expired.append(entry)
        for entry in expired:
            self._drop(
                entry,
                f"no association request within {self.limits.request_timeout_s:g} s",
                level=logging.INFO,
            )

    def _service(self, entry: _Waiting) -> None:
        try:
            if not entry.handshaken and not self._handshake(entry):
                return
            self._read(entry)
        except (OSError, ValueError) as exc:
            self._drop(entry, f"{type(exc).__name__}: {exc}", level=logging.INFO)

    def _handshake(self, entry: _Waiting) -> bool:
        sock = entry.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ)
            return False
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE)
            return False
        except ssl.SSLError as exc:
            self._drop(entry, f"TLS handshake failed: {exc.reason or exc}")
            return False
        entry.handshaken = True
        self._selector.modify(sock, selectors.EVENT_READ)
        return True

    def _read(self, entry: _Waiting) -> None:
        sock = entry.sock
        try:
            chunk = sock.recv(_READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE)
            return
        if not chunk:
            self._drop(entry, "closed by the peer before an association request",
                       level=logging.DEBUG)
            return
        entry.received += chunk
        self._judge(entry)

    def _judge(self, entry: _Waiting) -> None:
        """Hand over, refuse or keep waiting, by what the first PDU says so far."""
        if len(entry.received) < 6:
            return
        pdu_type, _, length = _PDU_HEADER.unpack_from(entry.received)
        if pdu_type == _A_ABORT:
            self._drop(entry, "aborted before an association request", level=logging.DEBUG)
        elif pdu_type != _A_ASSOCIATE_RQ:
            known = 0x01 <= pdu_type <= 0x07
            self._drop(
                entry,
                f"sent PDU type 0x{pdu_type:02X} before an association request",
                abort=_UNEXPECTED_PDU if known else _UNRECOGNISED_PDU,
            )
        elif length > ASSOCIATION_REQUEST_LIMIT:
            self._drop(
                entry,
                f"association request of {length} bytes exceeds the limit of "
                f"{ASSOCIATION_REQUEST_LIMIT}",
                abort=_INVALID_PARAMETER,
            )
        elif len(entry.received) >= 6 + length:
            self._release(entry)
            sock = entry.sock
            try:
                sock.setblocking(True)
                sock.settimeout(entry.timeout)
                self._hand_over(sock, entry.address, bytes(entry.received))
            except Exception as exc:  # e.g. no thread could be started: the peer is told
                LOGGER.error("Closed connection from %s: cannot start its association: %s: %s",
                             entry.describe(), type(exc).__name__, exc)
                with contextlib.suppress(OSError, ValueError):
                    sock.send(_abort_pdu(0x00))
                self._close(sock)
        elif not self._readable_soon(entry):
            self._read(entry)

    @staticmethod
    def _readable_soon(entry: _Waiting) -> bool:
        """Whether to wait for the selector (no decrypted TLS bytes already pending)."""
        pending = getattr(entry.sock, "pending", None)
        return not (pending is not None and pending())

    def _release(self, entry: _Waiting) -> None:
        """Forget ``entry`` (its socket stays open)."""
        if self._waiting.pop(entry.sock, None) is None:
            return
        self._per_host[entry.host] -= 1
        if self._per_host[entry.host] <= 0:
            del self._per_host[entry.host]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(entry.sock)

    def _drop(
        self,
        entry: _Waiting,
        reason: str,
        *,
        level: int = logging.WARNING,
        abort: int | None = None,
    ) -> None:
        self._release(entry)
        LOGGER.log(level, "Closed connection from %s: %s", entry.describe(), reason)
        if abort is not None:
            with contextlib.suppress(OSError, ValueError):
                entry.sock.send(_abort_pdu(abort))
        self._close(entry.sock)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.close()
