"""A TCP proxy on 127.0.0.1 that records every byte a client sends through it.

Put between the node and the federation API (the node's ``[federation] url`` points at the
proxy), it sees exactly what leaves the hospital: tests search the record for identifiers
and pixel data.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class CapturingProxy:
    """Forwards connections to ``upstream``; :attr:`sent` holds all client-to-server bytes."""

    def __init__(self, upstream_port: int, *, forwarding: bool = True) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._sent = bytearray()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.forwarding = forwarding
        """False: connections are accepted and recorded but never answered (a hung server)."""

    @property
    def sent(self) -> bytes:
        with self._lock:
            return bytes(self._sent)

    def __enter__(self) -> CapturingProxy:
        thread = threading.Thread(target=self._accept, daemon=True, name="proxy-accept")
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stopped.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            if not self.forwarding:
                threading.Thread(target=self._swallow, args=(client,), daemon=True,
                                 name="proxy-swallow").start()
                continue
            upstream = socket.create_connection(self._upstream)
            for source, target, record in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pump, args=(source, target, record),
                                          daemon=True, name="proxy-pump")
                thread.start()

    def _swallow(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client:
            while chunk := client.recv(65536):
                with self._lock:
                    self._sent.extend(chunk)

    def _pump(self, source: socket.socket, target: socket.socket, record: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if record:
                    with self._lock:
                        self._sent.extend(chunk)
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
