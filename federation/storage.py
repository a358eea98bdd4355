"""Artifact storage: weights, manifests and uploaded updates, addressed by key.

The database holds rows; the bytes they describe live in an :class:`ArtifactStore`. The
interface is the part of an object store the server needs (whole-object put and get, no
appends, no listing), so that an S3-compatible store can be added beside
:class:`FileSystemStore` without touching the callers. What both must guarantee: a ``put``
is atomic (a reader, on any replica, sees the previous object or the new one, never a
half-written artifact), and a key means the same object everywhere.

Keys are relative, ``/``-separated paths like ``leg/generations/3/model.safetensors``:
segments of ``[A-Za-z0-9._-]`` that do not start with a dot. Anything else is refused with a
``ValueError`` naming the key, so that no key can climb out of the store's root
(``..``, absolute paths) or collide with the hidden temporary files of an atomic write.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from dafne_node.durable import fsync_dir, write_atomically

LOGGER = logging.getLogger(__name__)

__all__ = [
    "MAX_KEY_LENGTH",
    "ArtifactNotFound",
    "ArtifactStore",
    "FileSystemStore",
    "open_store",
    "validate_key",
]

MAX_KEY_LENGTH = 512
# Room for the ".<name>.<random>" temporary name of an atomic write within NAME_MAX (255).
_MAX_SEGMENT_LENGTH = 200
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class ArtifactNotFound(KeyError):  # noqa: N818 - reads as the condition, like KeyError
    """No artifact is stored under the key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        """Say which key is missing (KeyError would print only the quoted key)."""
        return f"no artifact stored under key {self.key!r}"


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid artifact key.

    Raises
    ------
    ValueError
        Naming the key and the rule it breaks.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"artifact key {key!r} must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"artifact key {key[:40]!r}... is {len(key)} characters long; at most "
            f"{MAX_KEY_LENGTH} are allowed")
    if key.startswith("/"):
        raise ValueError(f"artifact key {key!r} must be relative (no leading '/')")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(
                f"artifact key {key!r} has an empty, '.' or '..' segment")
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"artifact key {key!r}: segment {segment!r} must consist of A-Z, a-z, 0-9, "
                "'.', '_' and '-' and not start with '.'")
        if len(segment) > _MAX_SEGMENT_LENGTH:
            raise ValueError(
                f"artifact key {key!r}: segment of {len(segment)} characters; at most "
                f"{_MAX_SEGMENT_LENGTH} are allowed")
    return key


class ArtifactStore(ABC):
    """Whole-object storage of artifacts by key."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there; atomic and durable."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``; :class:`ArtifactNotFound` if there are none."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A binary stream of the artifact, for large downloads; the caller closes it."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an artifact is stored under ``key``."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes of the artifact; :class:`ArtifactNotFound` if there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the artifact; a missing one is not an error (as in S3)."""


class FileSystemStore(ArtifactStore):
    """Artifacts as files under ``root`` (a local disk or a shared filesystem).

    Each ``put`` goes through :func:`dafne_node.durable.write_atomically`: a temporary
    file beside the target, fsynced, renamed over it. On a filesystem shared by several
    API replicas (NFS, CephFS) rename is atomic too, so replicas never serve a torn file.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        """Name the root, for logs."""
        return f"FileSystemStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` atomically to the key's file, creating folders as needed."""
        path = self._path(key)
        write_atomically(path, lambda stream: stream.write(data))
        LOGGER.debug("stored %d bytes under %s", len(data), key)

    def get(self, key: str) -> bytes:
        """Read the whole artifact."""
        with self.open(key) as stream:
            return stream.read()

    def open(self, key: str) -> BinaryIO:
        """Open the artifact's file for reading."""
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(key) from None

    def exists(self, key: str) -> bool:
        """Whether the key's file exists (a folder of longer keys does not count)."""
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        """Size of the key's file."""
        path = self._path(key)
        if not path.is_file():
            raise ArtifactNotFound(key)
        return path.stat().st_size

    def delete(self, key: str) -> None:
        """Unlink the key's file and make the removal durable."""
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        fsync_dir(path.parent)
        LOGGER.debug("deleted %s", key)


def open_store(location: str | Path) -> ArtifactStore:
    """The artifact store that the ``storage`` setting names.

    Parameters
    ----------
    location:
        ``file:///absolute/path`` or a plain path: a :class:`FileSystemStore` there.
        ``s3://bucket/prefix`` is reserved for an S3-compatible store, not built in yet.

    Raises
    ------
    ValueError
        For an S3 location or any other URL scheme, naming the setting ``storage``.
    """
    if isinstance(location, Path):
        return FileSystemStore(location)
    text = location.strip()
    if not text:
        raise ValueError("setting `storage` is empty; give a directory or a file:// URL")
    if "://" not in text:
        return FileSystemStore(Path(text))
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        raise ValueError(
            f"setting `storage` = {text!r}: S3-compatible artifact storage is not built in "
            "yet; use a directory (a plain path or file:///absolute/path)")
    if scheme != "file":
        raise ValueError(
            f"setting `storage` = {text!r}: unsupported scheme {parts.scheme!r}; use a "
            "directory (a plain path or file:///absolute/path)")
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ValueError(
            f"setting `storage` = {text!r}: a file URL must name an absolute local path, "
            "file:///absolute/path")
    return FileSystemStore(Path(unquote(parts.path)))
