"""The on-disk spool of received instances.

A received instance is acknowledged only once it is durable, so every file is written to a
temporary name in its final directory, flushed with ``fdatasync``, and renamed; the rename
itself becomes durable when the directory is fsynced, which :meth:`Spool.sync_dirs` does
for a whole batch of instances at once (group commit). A file under its final name is
therefore always complete: a crash leaves at most a ``*.tmp`` file, which
:meth:`Spool.remove_temp_files` deletes at start (it was never acknowledged).

The layout is deterministic, ``<root>/<Study UID>/<Series UID>/<SOP Instance UID>.dcm``,
so the same instance received twice lands on the same path and is stored once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

__all__ = ["Spool", "SpoolError"]

LOGGER = logging.getLogger(__name__)

_SAFE_UID = re.compile(r"[0-9.]{1,64}")
_SUFFIX = ".dcm"
_TEMP_SUFFIX = ".tmp"
_KNOWN_DIRS_LIMIT = 100_000


class SpoolError(OSError):
    """Writing to the spool failed (disk full, permissions, I/O error)."""


def _component(uid: str) -> str:
    """A path component for ``uid`` that cannot escape the spool directory.

    Conformant UIDs (digits and dots) are used as they are; anything else (seen from
    misconfigured modalities) is replaced by a stable hash.
    """
    if _SAFE_UID.fullmatch(uid) and uid not in (".", ".."):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable, deterministic file storage for received instances.

    Parameters
    ----------
    root : pathlib.Path
        The spool directory; created if missing.
    durable : bool
        Flush files and directories to stable storage (``fdatasync``/``fsync``). Only
        tests on throw-away directories should turn this off.
    """

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = Path(root).resolve()
        self.durable = durable
        self.root.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()

    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """The path of an instance relative to the root, with ``/`` separators."""
        return (
            f"{_component(study_uid)}/{_component(series_uid)}/"
            f"{_component(sop_instance_uid)}{_SUFFIX}"
        )

    def path(self, relative: str) -> Path:
        """The absolute path of a spool-relative path."""
        return self.root / relative

    def exists(self, relative: str) -> bool:
        """Whether a complete file is stored under ``relative``."""
        return os.path.exists(self.root / relative)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        created: list[Path] = []
        probe = directory
        while probe != self.root and not probe.is_dir():
            created.append(probe)
            probe = probe.parent
        directory.mkdir(parents=True, exist_ok=True)
        if self.durable:
            # a new directory entry is durable only once its parent is fsynced
            for new in created:
                _fsync_dir(new.parent)
        with self._lock:
            if len(self._known_dirs) > _KNOWN_DIRS_LIMIT:
                self._known_dirs.clear()
            self._known_dirs.add(directory)

    def write(self, relative: str, chunks: Sequence[bytes | memoryview]) -> int:
        """Write ``chunks`` atomically to ``relative``; return the number of bytes.

        The data is flushed before the rename, so the final name never refers to a
        partial file. The rename is durable after :meth:`sync_dirs` on its directory.

        Raises
        ------
        SpoolError
            If the file cannot be written; no temporary file is left behind.
        """
        final = self.root / relative
        directory = final.parent
        temp = directory / f".{final.name}.{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}"
        try:
            self._ensure_dir(directory)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot create {temp}: {exc.strerror}") from exc
        total = sum(len(chunk) for chunk in chunks)
        try:
            try:
                pending = [memoryview(chunk) for chunk in chunks]
                while pending:
                    written = os.writev(fd, pending)
                    while pending and written >= len(pending[0]):
                        written -= len(pending[0])
                        pending.pop(0)
                    if pending and written:
                        pending[0] = pending[0][written:]
                if self.durable:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise SpoolError(exc.errno, f"cannot write {final}: {exc.strerror}") from exc
        return total

    def sync_dirs(self, relatives: Iterable[str]) -> None:
        """Make the renames of the given files durable: fsync each distinct directory once."""
        if not self.durable:
            return
        directories = {(self.root / relative).parent for relative in relatives}
        for directory in directories:
            _fsync_dir(directory)

    def free_bytes(self) -> int:
        """Bytes available to this process on the spool's file system."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def recover(self, is_indexed: Callable[[str], bool] | None = None) -> tuple[int, int]:
        """Deal with temporary files left by a crash; return ``(completed, removed)``.

        A temporary file is complete once it has been fdatasynced, and the index records an
        instance only after that. So a temporary file whose final name is missing but whose
        path ``is_indexed`` says is recorded lost only its rename (the node died between
        the index commit and the directory fsync): the rename is redone. Every other
        temporary file was never acknowledged and is deleted.

        Parameters
        ----------
        is_indexed : callable, optional
            Takes a spool-relative path, tells whether the index has it. Without it every
            temporary file is deleted.
        """
        completed = removed = 0
        for directory, _, files in os.walk(self.root):
            for name in files:
                if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX)):
                    continue
                temp = Path(directory) / name
                final = temp.with_name(name[1:].rsplit(".", 2)[0])
                relative = final.relative_to(self.root).as_posix()
                try:
                    if not final.exists() and is_indexed is not None and is_indexed(relative):
                        os.replace(temp, final)
                        if self.durable:
                            _fsync_dir(final.parent)
                        completed += 1
                    else:
                        temp.unlink()
                        removed += 1
                except OSError as exc:
                    LOGGER.warning("cannot recover temporary spool file %s: %s", temp, exc)
        if completed or removed:
            LOGGER.info(
                "spool recovery after a crash: %d renames completed, %d unacknowledged "
                "partial files removed",
                completed,
                removed,
            )
        return completed, removed

    def remove_temp_files(self) -> int:
        """Delete every temporary file left by a crash; return how many."""
        return self.recover(None)[1]

    def iter_files(self) -> Iterator[str]:
        """All stored instances, as spool-relative paths."""
        for directory, _, files in os.walk(self.root):
            for name in files:
                if name.endswith(_SUFFIX) and not name.startswith("."):
                    yield os.path.relpath(os.path.join(directory, name), self.root).replace(
                        os.sep, "/"
                    )
