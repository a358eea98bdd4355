"""The on-disk spool of received instances.

A received instance is acknowledged only once it is durable, so every file is written to a
temporary name in its final directory, flushed with ``fdatasync``, and renamed; the rename
itself becomes durable when the directory is fsynced, which :meth:`Spool.sync_dirs` does
for a whole batch of instances at once (group commit). A file under its final name is
therefore always complete: a crash leaves at most a ``*.tmp`` file, which
:meth:`Spool.recover` deletes at start (it was never acknowledged).

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Spool", "SpoolError", "StagedFile"]

LOGGER = logging.getLogger(__name__)

_SAFE_UID = re.compile(r"[0-9.]{1,64}")
_SUFFIX = ".dcm"
_TEMP_SUFFIX = ".tmp"
_KNOWN_DIRS_LIMIT = 100_000


@dataclass(frozen=True)
class StagedFile:
    """A file written under its temporary name, open, not yet flushed or renamed."""

    fd: int
    temp: Path
    final: Path
    size: int


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
        staged = self.stage(relative, chunks)
        self.finish([staged])
        return staged.size

    def stage(self, relative: str, chunks: Sequence[bytes | memoryview]) -> StagedFile:
        """Write ``chunks`` under a temporary name next to ``relative``, not yet flushed.

        :meth:`finish` makes it durable and gives it its final name. Splitting the two
        lets the receiver flush the file while it commits the index, instead of after.

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
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise SpoolError(exc.errno, f"cannot write {final}: {exc.strerror}") from exc
        return StagedFile(fd=fd, temp=temp, final=final, size=total)

    def finish(self, staged: Sequence[StagedFile]) -> None:
        """Flush each staged file, rename it to its final name, close it.

        Raises
        ------
        SpoolError
            For the first file that fails; its temporary file is removed. The other
            files are still finished.
        """
        failure: SpoolError | None = None
        for item in staged:
            try:
                try:
                    if self.durable:
                        os.fdatasync(item.fd)
                finally:
                    os.close(item.fd)
                os.replace(item.temp, item.final)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(item.temp)
                failure = failure or SpoolError(
                    exc.errno, f"cannot write {item.final}: {exc.strerror}")
        if failure is not None:
            raise failure

    def discard(self, staged: StagedFile) -> None:
        """Close and delete a staged file that will not be finished."""
        with contextlib.suppress(OSError):
            os.close(staged.fd)
        with contextlib.suppress(OSError):
            os.unlink(staged.temp)

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

    def recover(self) -> int:
        """Delete the temporary files a crash left behind; return how many.

        A temporary file may not have been flushed (the receiver flushes it while it
        commits the index), so none is trusted. None of them was acknowledged: an
        instance is answered only after its file is flushed and renamed and the rename
        is durable, so the sender still has it and sends it again, and a resend writes
        the file anew because its final name does not exist.
        """
        removed = 0
        for directory, _, files in os.walk(self.root):
            for name in files:
                if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX)):
                    continue
                try:
                    (Path(directory) / name).unlink()
                    removed += 1
                except OSError as exc:
                    LOGGER.warning("cannot remove temporary spool file %s: %s", name, exc)
        if removed:
            LOGGER.info("spool recovery after a crash: %d unacknowledged partial files removed",
                        removed)
        return removed

    def iter_files(self) -> Iterator[str]:
        """All stored instances, as spool-relative paths."""
        for directory, _, files in os.walk(self.root):
            for name in files:
                if name.endswith(_SUFFIX) and not name.startswith("."):
                    yield os.path.relpath(os.path.join(directory, name), self.root).replace(
                        os.sep, "/"
                    )
