"""Read-only admin commands never create or migrate the node's database; they say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from dafne_node.app.cli import main
from db.migrate import current_revision, head_revision, upgrade
from db.session import make_engine


def _database(tmp_path: Path, revision: str | None) -> Path:
    data = tmp_path / "node"
    data.mkdir()
    if revision is not None:
        upgrade(data / "dafne.db", revision)
    return data


@pytest.mark.parametrize("command", [["status"], ["corrections"], ["jobs", "retry", "1"]])
def test_no_database_is_an_error_and_none_is_created(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    data = _database(tmp_path, None)
    assert main([*command, "--data-dir", str(data)]) == 1
    assert "no node database at" in capsys.readouterr().err
    assert not (data / "dafne.db").exists()


@pytest.mark.parametrize("command", [["status"], ["corrections"], ["jobs", "retry", "1"]])
def test_an_older_schema_is_reported_not_migrated(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    data = _database(tmp_path, "0001_node")
    assert main([*command, "--data-dir", str(data)]) == 1
    error = capsys.readouterr().err
    assert f"schema revision 0001_node, this dafne-node expects {head_revision()}" in error
    assert "dafne-node serve" in error
    engine = make_engine(data / "dafne.db")
    try:
        assert current_revision(engine) == "0001_node"  # untouched
    finally:
        engine.dispose()


def test_a_current_database_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _database(tmp_path, "head")
    assert main(["status", "--json", "--data-dir", str(data)]) == 0
    assert '"instances_received": 0' in capsys.readouterr().out
