"""``dafne-node echo`` and ``send``, as a PACS administrator tests a route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dafne_node.app.cli import main
from dicom_scp.receiver import StorageServer
from dicom_scp.spool import Spool
from tests.conftest import WrittenStudy
from tests.dicom_scp.helpers import MemoryIndex


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[StorageServer, MemoryIndex]]:
    index = MemoryIndex()
    server = StorageServer(ae_title="PACS", host="127.0.0.1", port=0,
                           spool=Spool(tmp_path / "pacs"), index=index)
    server.start()
    yield server, index
    server.stop(timeout=5)


def test_echo_reports_success(pacs: tuple[StorageServer, MemoryIndex],
                              capsys: pytest.CaptureFixture[str]) -> None:
    server, _ = pacs
    assert main(["echo", f"PACS@127.0.0.1:{server.port}"]) == 0
    assert "status 0x0000 (success)" in capsys.readouterr().out


def test_echo_to_nobody_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["echo", "PACS@127.0.0.1:9", "--timeout", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dafne-node echo: PACS@127.0.0.1:9")


def test_send_delivers_a_folder(pacs: tuple[StorageServer, MemoryIndex],
                                small_study: WrittenStudy,
                                capsys: pytest.CaptureFixture[str]) -> None:
    server, index = pacs
    folder = small_study.files.images[0].parent
    assert main(["send", str(folder), "--to", f"PACS@127.0.0.1:{server.port}"]) == 0
    assert f"Sent 12 of 12 files to PACS@127.0.0.1:{server.port}" in capsys.readouterr().out
    assert set(index.records) == set(small_study.study.sop_instance_uids)


def test_bad_destination_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "x.dcm", "--to", "nonsense"]) == 1
    assert "--to: 'nonsense' is not of the form AE@host:port" in capsys.readouterr().err
