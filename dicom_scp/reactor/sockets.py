"""Socket tuning for accepted associations: quick ACKs and whole-PDU reads.

Why: pynetdicom reads a PDU in 4 KiB ``recv`` calls and leaves Linux's delayed ACKs on.
The first costs a system call and a copy per 4 KiB; the second stalls every instance from a
peer that leaves Nagle's algorithm on (most modalities) by ~40 ms.
"""

from __future__ import annotations

import socket
import time
from typing import Any, cast

from pynetdicom.transport import AssociationSocket

__all__ = ["PREALLOCATE_LIMIT", "TunedSocket", "quickack"]

PREALLOCATE_LIMIT = 8 * 1024 * 1024
"""Largest read that is given its whole buffer before the bytes arrive."""

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def quickack(sock: socket.socket) -> None:
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


class TunedSocket(AssociationSocket):
    """``AssociationSocket`` that reads whole PDUs into one buffer.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association the socket belongs to.
    client_socket : socket.socket
        The accepted connection.
    received : bytes
        Bytes already read from the connection before the association existed (the
        A-ASSOCIATE-RQ that admission waited for); they are read first.
    timeout : float, optional
        Seconds a read or a write may wait for the peer, and the most one read of a PDU
        (header or body) may take in all. Why: a peer that announces a PDU and then sends
        it a byte at a time, or stops reading our responses, would otherwise hold its
        receive thread, and its association slot, for as long as TCP keeps the connection.
    """

    def __init__(
        self,
        assoc: Any,
        client_socket: socket.socket,
        received: bytes = b"",
        timeout: float | None = None,
    ) -> None:
        self._received = bytearray(received)
        self._timeout = timeout
        client_socket.settimeout(timeout)
        super().__init__(assoc, client_socket=client_socket)

    @property
    def buffered(self) -> bool:
        """Whether bytes read before the association are still waiting to be read."""
        return bool(self._received)

    @property
    def ready(self) -> bool:
        """Whether a read would not block: buffered bytes, or data on the socket."""
        return bool(self._received) or bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closed the connection)."""
        if self._received:
            head = self._received[:nr_bytes]
            del self._received[:nr_bytes]
            if len(head) < nr_bytes:
                head += self._read(nr_bytes - len(head))
            return head
        return self._read(nr_bytes)

    def _read(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        quickack(sock)
        if nr_bytes > PREALLOCATE_LIMIT:  # don't trust a huge length before data arrives
            return super().recv(nr_bytes)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        try:
            while received < nr_bytes:
                count = sock.recv_into(view[received:], nr_bytes - received)
                if not count:
                    break
                received += count
                if deadline is not None and received < nr_bytes and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{received} of {nr_bytes} bytes in {self._timeout:g} s (too slow)"
                    )
        finally:
            view.release()
        if received < nr_bytes:
            del buffer[received:]
        return buffer
