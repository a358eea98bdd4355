"""Fixtures for the DICOM layer: test files, a running SCP, dcmtk on loopback.

Every server a test starts is stopped in teardown; every dcmtk call has a timeout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db.migrate import upgrade
from db.repository import SqlInstanceIndex
from db.session import make_engine
from dicom_scp.receiver import StorageServer
from dicom_scp.spool import Spool
from tests.dicom_scp.helpers import MemoryIndex, ServerFactory, make_mr


@pytest.fixture(scope="session")
def mr_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Twelve 32x32 MR images of one series."""
    return make_mr(tmp_path_factory.mktemp("mr"), 12)


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start a ``StorageServer`` on a free loopback port; stopped after the test.

    Keyword arguments go to ``StorageServer``; ``index="sqlite"`` uses the real database
    index (in ``tmp_path``), the default is a :class:`MemoryIndex`.
    """
    started: list[tuple[StorageServer, Any]] = []

    def start(**kwargs: Any) -> StorageServer:
        index = kwargs.pop("index", None)
        closer = None
        if index == "sqlite":
            engine = make_engine(tmp_path / f"node{len(started)}.db")
            upgrade(engine)
            index = SqlInstanceIndex(engine)
            closer = (index, engine)
        kwargs.setdefault("ae_title", "DAFNE")
        kwargs.setdefault("spool", Spool(tmp_path / f"spool{len(started)}"))
        server = StorageServer(host="127.0.0.1", port=0, index=index or MemoryIndex(), **kwargs)
        server.start()
        started.append((server, closer))
        return server

    yield start
    for server, closer in started:
        server.stop(timeout=5)
        if closer is not None:
            closer[0].close()
            closer[1].dispose()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp on a free port writing to a folder: ``(port, folder)``."""
    if not os.path.exists("/usr/bin/storescp"):
        pytest.skip("storescp not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "storescp"
    out.mkdir()
    process = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "PACS", "-od", str(out), str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port, out
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(out, ignore_errors=True)
