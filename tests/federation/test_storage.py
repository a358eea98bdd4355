"""Artifact storage: whole objects by key, written atomically, keys that stay inside the root."""

from __future__ import annotations

from pathlib import Path

import pytest

from dafne_node import durable
from federation.storage import (
    MAX_KEY_LENGTH,
    ArtifactNotFound,
    ArtifactStore,
    FileSystemStore,
    open_store,
)

WEIGHTS = bytes(range(256)) * 64


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_put_get_open_exists_size_delete(tmp_path: Path) -> None:
    store = FileSystemStore(tmp_path / "artifacts")
    key = "leg/generations/3/model.safetensors"
    assert not store.exists(key)
    store.put(key, WEIGHTS)
    assert store.exists(key)
    assert store.get(key) == WEIGHTS
    assert store.size(key) == len(WEIGHTS) == 16384
    with store.open(key) as stream:
        assert stream.read(4) == b"\x00\x01\x02\x03"
        assert stream.read() == WEIGHTS[4:]
    assert (tmp_path / "artifacts" / "leg" / "generations" / "3" / "model.safetensors"
            ).read_bytes() == WEIGHTS

    store.put(key, b"replaced")
    assert store.get(key) == b"replaced"
    assert store.size(key) == 8
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.size("empty") == 0

    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting what is gone is not an error, as in S3
    assert _files(tmp_path / "artifacts") == ["empty"]


def test_missing_artifacts_raise_artifact_not_found(tmp_path: Path) -> None:
    store = FileSystemStore(tmp_path)
    store.put("leg/updates/a.bin", b"x")
    for missing in ("leg/updates/b.bin", "leg/updates", "leg/updates/a.bin/c", "other"):
        assert not store.exists(missing)
        with pytest.raises(ArtifactNotFound, match=f"no artifact stored under key '{missing}'"):
            store.get(missing)
        with pytest.raises(ArtifactNotFound):
            store.open(missing)
        with pytest.raises(ArtifactNotFound):
            store.size(missing)
    with pytest.raises(KeyError):
        store.get("leg/updates/b.bin")
    assert ArtifactNotFound("k").key == "k"


@pytest.mark.parametrize("key", [
    "", "/abs/path", "a/../b", "..", "a/./b", "a//b", "a/", "weights\\x", "a b", "é",
    ".hidden", "leg/.tmp", "a\x00b", "x" * (MAX_KEY_LENGTH + 1), "a/" + "y" * 201,
])
def test_bad_keys_are_refused_naming_the_key(tmp_path: Path, key: str) -> None:
    store = FileSystemStore(tmp_path / "root")
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key),
                 lambda: store.exists(key), lambda: store.size(key),
                 lambda: store.delete(key), lambda: store.open(key)):
        with pytest.raises(ValueError, match="artifact key") as info:
            call()
        assert repr(key[:40]) in str(info.value) or repr(key) in str(info.value)
    assert not (tmp_path / "root").exists()


def test_good_keys_with_dots_dashes_and_underscores(tmp_path: Path) -> None:
    store = FileSystemStore(tmp_path)
    for key in ("leg/3.manifest.json", "A-b_c/0123456789abcdef.update", "x" * 200):
        store.put(key, key.encode())
        assert store.get(key) == key.encode()


def test_put_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = FileSystemStore(tmp_path)
    for i in range(5):
        store.put(f"leg/updates/{i}.bin", WEIGHTS)
    store.put("leg/updates/0.bin", b"again")
    assert _files(tmp_path) == [f"leg/updates/{i}.bin" for i in range(5)]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_leaves_no_artifact_and_no_temporary_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    store = FileSystemStore(tmp_path)
    store.put("leg/kept.bin", b"previous")

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, failing, fail)
    with pytest.raises(OSError, match="No space left"):
        store.put("leg/new.bin", WEIGHTS)
    with pytest.raises(OSError, match="No space left"):
        store.put("leg/kept.bin", WEIGHTS)
    monkeypatch.undo()
    assert not store.exists("leg/new.bin")
    assert store.get("leg/kept.bin") == b"previous"
    assert _files(tmp_path) == ["leg/kept.bin"]


def test_open_store_locations(tmp_path: Path) -> None:
    for location in (tmp_path, str(tmp_path), f"file://{tmp_path}",
                     f"file://localhost{tmp_path}"):
        store = open_store(location)
        assert isinstance(store, FileSystemStore)
        assert isinstance(store, ArtifactStore)
        assert store.root == tmp_path
    assert open_store("file:///srv/dafne%20artifacts").root == Path("/srv/dafne artifacts")
    assert open_store("relative/artifacts").root == Path("relative/artifacts")


@pytest.mark.parametrize(("location", "message"), [
    ("s3://bucket/prefix", "S3-compatible artifact storage is not built in yet"),
    ("S3://bucket", "not built in yet"),
    ("https://example.org/artifacts", "unsupported scheme 'https'"),
    ("file://server/share", "absolute local path"),
    ("  ", "is empty"),
])
def test_unsupported_locations_name_the_setting(location: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        open_store(location)
    assert "`storage`" in str(info.value)
