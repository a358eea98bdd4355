"""The on-disk spool of received instances.

An instance is acknowledged only once it is durable, and that costs one flush on the
receive path, not two. Every file is written into a *slot*: an empty file in
``<root>/.incoming`` that was created ahead of time and whose directory entry is already
durable. The slot is flushed (``fdatasync``: its data and its size) and then linked under
its final name, at which point it is complete and may be acknowledged. The final directory
entry becomes durable a moment later, when the spool's keeper thread fsyncs the
directories of a whole batch of files at once; only then does it unlink the slot names.

So whatever the moment of a crash, an acknowledged instance has a durable name: its slot.
At the next start :meth:`Spool.leftovers` lists the slots that still hold data; the store
checks each against the index (size and CRC-32 recorded at receipt) and gives it its final
name with :meth:`Spool.adopt`, or removes it with :meth:`Spool.drop` if it was never
acknowledged (a slot can hold a half-written file: it is flushed only before the answer).
A file under its final name is always complete, because it is linked only after its flush.

The layout is deterministic, ``<root>/<Study UID>/<Series UID>/<SOP Instance UID>.dcm``,
so the same instance received twice lands on the same path and is stored once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Spool", "SpoolError", "StagedFile"]

LOGGER = logging.getLogger(__name__)

_SAFE_UID = re.compile(r"[0-9.]{1,64}")
_SUFFIX = ".dcm"
_LEGACY_TEMP_SUFFIX = ".tmp"  # temporary files of spools written before slots existed
_INCOMING = ".incoming"
_SLOT_SUFFIX = ".slot"
_CLAIM = ".receiver.lock"
_KNOWN_DIRS_LIMIT = 100_000

SLOTS_FREE = 512
"""Free slots the keeper keeps in stock (about a second of receiving at full speed)."""
SLOTS_PER_ROUND = 32
"""Slots the keeper creates (and makes durable with one directory fsync) at a time.

Creating a file can cost a millisecond of kernel time on a file system that recently freed
many inodes; small rounds spread that work out instead of stalling the receive path with
bursts of it.
"""
KEEPER_INTERVAL_S = 0.2
"""Longest a linked file waits for its directory fsync (bounds the work after a crash)."""
LINKS_PER_SYNC = 512
"""Linked files that wake the keeper before its interval is up."""


@dataclass(frozen=True)
class StagedFile:
    """A file written into a slot, open, not yet flushed or given its final name."""

    fd: int
    slot: str
    final: str
    size: int
    crc32: int
    slot_is_durable: bool
    """False if the slot was made on demand, its directory entry not yet flushed."""


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


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunks: Sequence[bytes | memoryview]) -> int:
    """Write ``chunks`` with as few system calls as the kernel allows; return the CRC-32."""
    pending = [memoryview(chunk) for chunk in chunks]
    crc = 0
    for chunk in pending:
        crc = zlib.crc32(chunk, crc)
    while pending:
        written = os.writev(fd, pending)
        while pending and written >= len(pending[0]):
            written -= len(pending[0])
            pending.pop(0)
        if pending and written:
            pending[0] = pending[0][written:]
    return crc


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
        self._root = str(self.root)
        self._incoming = os.path.join(self._root, _INCOMING)
        for directory in (self._root, self._incoming):
            if not os.path.isdir(directory):
                os.makedirs(directory, exist_ok=True)
                self._sync_dir(os.path.dirname(directory))
        self._known_dirs: set[str] = set()
        self._free: deque[str] = deque()
        self._linked: list[tuple[str, str]] = []  # (slot, final directory) awaiting fsync
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._keeper: threading.Thread | None = None
        self._closing = False
        self._claim: int | None = None
        self._free.extend(self._empty_slots())

    # -- paths -------------------------------------------------------------------------

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
        return os.path.exists(os.path.join(self._root, relative))

    def iter_files(self) -> Iterator[str]:
        """All stored instances, as spool-relative paths."""
        for directory, subdirectories, files in os.walk(self._root):
            if directory == self._root and _INCOMING in subdirectories:
                subdirectories.remove(_INCOMING)
            for name in files:
                if name.endswith(_SUFFIX) and not name.startswith("."):
                    yield os.path.relpath(os.path.join(directory, name), self._root).replace(
                        os.sep, "/"
                    )

    def free_bytes(self) -> int:
        """Bytes available to this process on the spool's file system."""
        stats = os.statvfs(self._root)
        return stats.f_bavail * stats.f_frsize

    # -- receiving -----------------------------------------------------------------------

    def write(self, relative: str, chunks: Sequence[bytes | memoryview]) -> int:
        """Write ``chunks`` to ``relative`` durably; return the number of bytes.

        Raises
        ------
        SpoolError
            If the file cannot be written; no partial file is left behind.
        """
        staged = self.stage(relative, chunks)
        self.finish([staged])
        self.flush()
        return staged.size

    def stage(self, relative: str, chunks: Sequence[bytes | memoryview]) -> StagedFile:
        """Write ``chunks`` into a free slot for ``relative``, not yet flushed.

        :meth:`finish` flushes it and gives it its final name. Splitting the two lets the
        receiver flush the file while it commits the index, instead of after.

        Raises
        ------
        SpoolError
            If the file cannot be written; the slot is removed again.
        """
        final = os.path.join(self._root, relative)
        try:
            self._ensure_dir(os.path.dirname(final))
            slot, fd, durable = self._take_slot()
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot create {relative}: {exc.strerror}") from exc
        try:
            try:
                crc = _write_all(fd, chunks)
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(slot)
            raise SpoolError(exc.errno, f"cannot write {relative}: {exc.strerror}") from exc
        size = sum(len(chunk) for chunk in chunks)
        return StagedFile(
            fd=fd, slot=slot, final=final, size=size, crc32=crc, slot_is_durable=durable
        )

    def finish(self, staged: Sequence[StagedFile]) -> None:
        """Flush each staged file and link it under its final name; then it is complete.

        The final name becomes durable with the keeper's next directory fsync; until then
        the slot keeps the file reachable (see the module docstring). A file whose slot was
        made on demand has its final directory flushed here, before this returns.

        Raises
        ------
        SpoolError
            For the first file that fails; its slot is removed. The others still finish.
        """
        failure: SpoolError | None = None
        linked: list[tuple[str, str]] = []
        for item in staged:
            try:
                try:
                    if self.durable:
                        os.fdatasync(item.fd)
                finally:
                    os.close(item.fd)
                self._link(item.slot, item.final)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(item.slot)
                failure = failure or SpoolError(
                    exc.errno, f"cannot write {item.final}: {exc.strerror}"
                )
                continue
            if item.slot_is_durable:
                linked.append((item.slot, os.path.dirname(item.final)))
            else:
                self._sync_dir(os.path.dirname(item.final))
                with contextlib.suppress(OSError):
                    os.unlink(item.slot)
        if linked:
            with self._lock:
                self._linked += linked
                if len(self._linked) >= LINKS_PER_SYNC:
                    self._wake.notify()
        if failure is not None:
            raise failure

    def discard(self, staged: StagedFile) -> None:
        """Close and delete a staged file that will not be finished."""
        with contextlib.suppress(OSError):
            os.close(staged.fd)
        with contextlib.suppress(OSError):
            os.unlink(staged.slot)

    def claim(self) -> None:
        """Take the spool for this process's receiver; fail if another receiver has it.

        Why: recovery removes what a stopped receiver left in the slots, which would
        destroy the files of a running one, and two receivers would hand out the same free
        slots. The claim is an ``flock``: it ends with :meth:`close` or with the process,
        however that ends.

        Raises
        ------
        SpoolError
            If another process holds the spool (its process ID is in the message).
        """
        if self._claim is not None:
            return
        fd = os.open(
            os.path.join(self._incoming, _CLAIM), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SpoolError(
                f"spool {self.root} is in use by another receiver (process {holder}); "
                "stop that one or give this one its own data folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._claim = fd

    def prepare(self, count: int = SLOTS_FREE) -> None:
        """Make free slots now, so the first files received need no flush of their own.

        The keeper makes more whenever they run low; call this once before receiving.
        """
        with self._lock:
            missing = count - len(self._free)
        if missing > 0:
            self._make_slots(missing)

    def flush(self) -> None:
        """Make every final name given so far durable now, instead of at the keeper's pace."""
        with self._lock:
            linked, self._linked = self._linked, []
        self._sync_linked(linked)

    def close(self) -> None:
        """Stop the keeper thread, flush and give up the claim (:meth:`stage` still works)."""
        with self._lock:
            keeper, self._keeper = self._keeper, None
            self._closing = True
            self._wake.notify()
        if keeper is not None:
            keeper.join()
        with self._lock:
            self._closing = False
        self.flush()
        claim, self._claim = self._claim, None
        if claim is not None:
            os.close(claim)

    # -- after a crash -------------------------------------------------------------------

    def recover(self) -> int:
        """Delete the temporary files of spools written before slots; return how many.

        Those were written to a temporary name next to their final name and renamed after
        their flush, so none of them was acknowledged.
        """
        removed = 0
        for directory, subdirectories, files in os.walk(self._root):
            if directory == self._root and _INCOMING in subdirectories:
                subdirectories.remove(_INCOMING)
            for name in files:
                if not (name.startswith(".") and name.endswith(_LEGACY_TEMP_SUFFIX)):
                    continue
                try:
                    os.unlink(os.path.join(directory, name))
                    removed += 1
                except OSError as exc:
                    LOGGER.warning("cannot remove temporary spool file %s: %s", name, exc)
        return removed

    def leftovers(self) -> list[Path]:
        """Slots that hold data: files received when the node stopped without flushing."""
        found = []
        with os.scandir(self._incoming) as entries:
            for entry in entries:
                if entry.name.endswith(_SLOT_SUFFIX) and entry.stat().st_size > 0:
                    found.append(Path(entry.path))
        return sorted(found)

    def adopt(self, slot: Path, relative: str) -> None:
        """Give a leftover slot its final name ``relative``, durably, and free the slot.

        If the final name exists already, it is complete and the slot is only removed.
        """
        final = os.path.join(self._root, relative)
        self._ensure_dir(os.path.dirname(final))
        if not os.path.exists(final):
            self._link(str(slot), final)
        self._sync_dir(os.path.dirname(final))
        os.unlink(slot)

    def drop(self, slot: Path) -> None:
        """Remove a leftover slot whose file was never acknowledged."""
        os.unlink(slot)

    # -- internals -----------------------------------------------------------------------

    def _sync_dir(self, directory: str) -> None:
        if self.durable:
            _fsync_dir(directory)

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._known_dirs:
            return
        created: list[str] = []
        probe = directory
        while probe != self._root and not os.path.isdir(probe):
            created.append(probe)
            probe = os.path.dirname(probe)
        os.makedirs(directory, exist_ok=True)
        # a new directory entry is durable only once its parent is fsynced
        for new in created:
            self._sync_dir(os.path.dirname(new))
        with self._lock:
            if len(self._known_dirs) > _KNOWN_DIRS_LIMIT:
                self._known_dirs.clear()
            self._known_dirs.add(directory)

    def _link(self, slot: str, final: str) -> None:
        try:
            os.link(slot, final)
        except FileExistsError:
            if not os.path.isfile(final):
                raise
            # the same instance, linked meanwhile by another association: it is complete

    def _take_slot(self) -> tuple[str, int, bool]:
        """A free slot, open for writing, and whether its directory entry is durable."""
        with self._lock:
            slot = self._free.popleft() if self._free else None
            self._start_keeper()
            if len(self._free) < SLOTS_FREE:
                self._wake.notify()
        if slot is not None:
            try:
                return slot, os.open(slot, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC), True
            except FileNotFoundError:  # removed by hand: make one instead
                pass
        slot = self._new_slot_name()
        fd = os.open(slot, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        return slot, fd, False

    def _new_slot_name(self) -> str:
        return os.path.join(self._incoming, uuid.uuid4().hex + _SLOT_SUFFIX)

    def _empty_slots(self) -> list[str]:
        """Empty slots left by an earlier run, made durable before they are used."""
        slots = []
        with os.scandir(self._incoming) as entries:
            for entry in entries:
                if entry.name.endswith(_SLOT_SUFFIX) and entry.stat().st_size == 0:
                    slots.append(entry.path)
        if slots:
            self._sync_dir(self._incoming)
        return slots

    def _start_keeper(self) -> None:
        # called with the lock held
        if self._keeper is None and not self._closing:
            self._keeper = threading.Thread(target=self._keep, name="spool-keeper", daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        """Flush final names in batches and keep free slots in stock, until closed."""
        last_sync = time.monotonic()
        while True:
            with self._lock:
                if self._closing:
                    return
                since_sync = time.monotonic() - last_sync
                sync_due = len(self._linked) >= LINKS_PER_SYNC or (
                    self._linked and since_sync >= KEEPER_INTERVAL_S
                )
                short = len(self._free) < SLOTS_FREE
                if not (sync_due or short):
                    wait = KEEPER_INTERVAL_S - since_sync if self._linked else KEEPER_INTERVAL_S
                    self._wake.wait(max(wait, 0.001))
                    continue
                linked: list[tuple[str, str]] = []
                if sync_due:
                    linked, self._linked = self._linked, []
            try:
                if linked:
                    self._sync_linked(linked)
                    last_sync = time.monotonic()
                if short:
                    self._make_slots(SLOTS_PER_ROUND)
            except OSError as exc:  # e.g. disk full: stage() makes slots on demand then
                LOGGER.error("spool keeper: %s", exc)
                self._wake_wait_after_error()
            except Exception:  # a bug: keep keeping, the receive path depends on it
                LOGGER.exception("spool keeper failed; retrying in a second")
                self._wake_wait_after_error()

    def _wake_wait_after_error(self) -> None:
        with self._lock:
            if not self._closing:
                self._wake.wait(1.0)

    def _sync_linked(self, linked: list[tuple[str, str]]) -> None:
        """Flush the directories of ``linked`` files, then remove their slot names."""
        if not linked:
            return
        try:
            for directory in {directory for _, directory in linked}:
                self._sync_dir(directory)
        except OSError:
            with self._lock:  # keep the slots: they still make the files reachable
                self._linked = linked + self._linked
            raise
        for slot, _ in linked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(slot)

    def _make_slots(self, count: int) -> None:
        made = []
        try:
            for _ in range(count):
                slot = self._new_slot_name()
                os.close(os.open(slot, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640))
                made.append(slot)
        finally:
            if made:
                self._sync_dir(self._incoming)  # also makes the unlinks above durable
                with self._lock:
                    self._free.extend(made)
