"""The receive pipeline behind C-STORE: check, parse, spool, index, answer.

One :class:`StoreService` serves all associations. Each C-STORE runs on its association's
thread: parse the header, write the file into a spool slot (a durable temporary name),
then :class:`GroupCommitter` records it in the index while a helper thread flushes the file
and links it under its final name (:mod:`dicom_scp.spool`). Concurrent C-STOREs share
index transactions: whoever finds no commit running commits everything queued, the others
wait for it. With one association that is one transaction per instance and no thread
switch; with eight the cost of a commit is shared. Nothing is answered before its own
commit and flush, and at start :meth:`StoreService.recover` completes or discards what a
crash left, checking each file against the size and CRC-32 the index recorded.

Status codes (Storage Service Class, PS3.4 §B.2.3); each failure has an Error Comment and a
log line with the reason:

======  ==============================================================
0x0000  stored (also for an instance already stored: stored once)
0xA700  out of resources: free disk below the watermark, disk full, or the
        instance larger than the node's maximum instance size
0xA701  out of resources: the spool could not be written (I/O error)
0xA702  out of resources: the index (database) could not be written
0xA900  data set does not match the SOP class of the request
0xC000  cannot understand: undecodable data set or missing UIDs
======  ==============================================================

An Error Comment (LO, at most 64 characters) leads with the reason, whole; details such
as the exception follow only as far as they fit (:func:`error_comment`). The log line has
everything.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_scp.ae import DAFNE_IMPLEMENTATION_UID, DAFNE_IMPLEMENTATION_VERSION
from dicom_scp.codec import encode_file_meta, text_value
from dicom_scp.deflate import InflateError, InflateLimitError, inflated_size
from dicom_scp.header import HeaderError, InstanceHeader, parse_header
from dicom_scp.policy import DiskWatermark
from dicom_scp.spool import Spool, SpoolError, StagedFile

__all__ = [
    "DEFAULT_MAX_INSTANCE_BYTES",
    "STATUS_BAD_DATASET",
    "STATUS_DISK_FULL",
    "STATUS_INDEX_FAILED",
    "STATUS_SOP_CLASS_MISMATCH",
    "STATUS_SPOOL_FAILED",
    "STATUS_SUCCESS",
    "STATUS_TOO_LARGE",
    "CommitTimeoutError",
    "GroupCommitter",
    "IndexResult",
    "IndexedFile",
    "InstanceIndex",
    "ReceivedInstance",
    "Recovery",
    "StoreRequest",
    "StoreResult",
    "StoreService",
    "error_comment",
    "too_large",
]

LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_INSTANCE_BYTES = 256 * 2**20
"""Largest instance accepted unless configured (``dicom.max_instance_mb``); it bounds the
memory one association's C-STORE can take while it arrives."""

STATUS_SUCCESS = 0x0000
STATUS_DISK_FULL = 0xA700
STATUS_TOO_LARGE = 0xA700  # PS3.4 has one "out of resources" code for both
STATUS_SPOOL_FAILED = 0xA701
STATUS_INDEX_FAILED = 0xA702
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_BAD_DATASET = 0xC000


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedInstance(InstanceHeader):
    """What the index records about one received, durably spooled instance.

    Its header, plus how and where it arrived.
    """

    transfer_syntax_uid: str
    spool_path: str
    size_bytes: int
    received_at: datetime
    calling_ae: str
    called_ae: str | None = None
    peer_address: str | None = None
    content_crc32: int | None = None
    """CRC-32 of the spooled file as written (``None`` if it was not written now)."""


_HEADER_FIELDS = tuple(field.name for field in fields(InstanceHeader))


class IndexResult(Protocol):
    """The index's answer for one instance."""

    @property
    def duplicate(self) -> bool:
        """True if the SOP Instance UID was already indexed (nothing was added)."""
        ...

    @property
    def spool_path(self) -> str:
        """The spool path on record for this SOP Instance UID."""
        ...


class IndexedFile(Protocol):
    """What the index recorded about an instance's file."""

    @property
    def spool_path(self) -> str:
        """Where the file is, relative to the spool."""
        ...

    @property
    def size_bytes(self) -> int:
        """Its size as written."""
        ...

    @property
    def content_crc32(self) -> int | None:
        """Its CRC-32 as written, if recorded."""
        ...


class InstanceIndex(Protocol):
    """Where received instances are recorded (the node's database).

    ``index_batch`` must record all of ``records`` in one transaction, be idempotent per
    SOP Instance UID, return one result per record in order, and return only after the
    transaction is durable. It is called from a single thread.
    """

    def index_batch(self, records: Sequence[ReceivedInstance]) -> Sequence[IndexResult]:
        """Record ``records``; see the class docstring for the contract."""
        ...

    def indexed_files(self, sop_instance_uids: Sequence[str]) -> Mapping[str, IndexedFile]:
        """The file recorded for each of these SOP Instance UIDs that is indexed."""
        ...


T = TypeVar("T")
R = TypeVar("R")


class CommitTimeoutError(TimeoutError):
    """An item was not committed in time (the database is locked or down)."""


class GroupCommitter(Generic[T, R]):
    """Commit items from many threads in shared batches (leader/follower group commit).

    A thread calling :meth:`commit` queues its item; if no batch is being committed it
    becomes the leader and commits everything queued (up to ``max_batch``) itself, then
    hands leadership to a waiting thread. So one association pays no thread switch at
    all, and eight concurrent associations share commits: while one batch is being
    written, the next one gathers.

    Parameters
    ----------
    commit : callable
        Takes a list of items, returns one result per item. Never called concurrently.
        If it raises for a batch of several items, each item is retried on its own so
        that one bad item fails alone.
    max_batch : int
        Most items per call.
    """

    def __init__(self, commit: Callable[[list[T]], Sequence[R]], *, max_batch: int = 256) -> None:
        self._commit = commit
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: list[tuple[T, Future[R]]] = []
        self._committing = False

    def commit(self, item: T, timeout: float | None = None) -> R:
        """Commit ``item`` (in some batch) and return its result.

        Raises
        ------
        CommitTimeoutError
            If it was not committed within ``timeout`` seconds; it may still be later.
        Exception
            Whatever the commit function raised for this item.
        """
        entry: tuple[T, Future[R]] = (item, Future())
        future = entry[1]
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._pending.append(entry)
            while not future.done():
                if not self._committing:
                    self._lead()
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    if entry in self._pending:
                        self._pending.remove(entry)
                    raise CommitTimeoutError("not committed in time")
                self._cond.wait(remaining)
        return future.result()

    def _lead(self) -> None:
        # called with the condition held; releases it while committing
        self._committing = True
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        self._cond.release()
        try:
            self._process(batch)
        finally:
            self._cond.acquire()
            self._committing = False
            self._cond.notify_all()

    def _process(self, batch: list[tuple[T, Future[R]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = self._commit(items)
            if len(results) != len(items):
                raise RuntimeError(f"commit returned {len(results)} results for {len(items)}")
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            LOGGER.warning("batch of %d failed (%s); retrying one by one", len(batch), exc)
            for entry in batch:
                self._process([entry])
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One C-STORE as the handler hands it over."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset: bytes | memoryview
    calling_ae: str
    called_ae: str | None = None
    peer_address: str | None = None


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :meth:`StoreService.recover` found after a crash."""

    completed: int
    """Files acknowledged (indexed, flushed) before the crash, now under their final name."""
    discarded: int
    """Files never acknowledged (not indexed, or not completely written): removed."""


ERROR_COMMENT_LENGTH = 64
"""An Error Comment is an LO: at most 64 characters (PS3.5 §6.2)."""


def error_comment(reason: str, detail: str | None = None) -> str:
    """An Error Comment that leads with ``reason``, whole, and adds ``detail`` where it fits.

    Why: senders show the Error Comment to the person at the modality; a comment filled
    with a path or a UID before the cause ("No space left on device") tells them nothing.
    Characters an LO may not hold (backslash, control characters) become ``?``.

    Raises
    ------
    ValueError
        If ``reason`` itself is longer than an Error Comment may be (a programming error:
        reasons are short fixed phrases).
    """
    reason = text_value(reason).strip()
    if len(reason) > ERROR_COMMENT_LENGTH:
        raise ValueError(f"Error Comment reason longer than 64 characters: {reason!r}")
    if not detail:
        return reason
    room = ERROR_COMMENT_LENGTH - len(reason) - 2
    detail = text_value(detail).strip()
    if room < 4:
        return reason
    if len(detail) > room:
        detail = detail[: room - 3].rstrip() + "..."
    return f"{reason}: {detail}"


def too_large(size: int | None, limit: int) -> StoreResult:
    """The answer for an instance over the size limit (``size`` if it is known)."""
    what = "inflated data set" if size is None else f"data set of {size} bytes"
    return StoreResult(
        STATUS_TOO_LARGE,
        f"{what} exceeds the node's maximum instance size of {limit} bytes",
        comment=error_comment(f"instance exceeds this node's size limit of {limit >> 20} MiB"),
    )


@dataclass(frozen=True, slots=True)
class StoreResult:
    """The answer for one C-STORE: a DIMSE status and, for failures, why.

    ``reason`` is the whole explanation, for the log; ``comment`` what the sender is told
    (:func:`error_comment`), the reason by default.
    """

    status: int
    reason: str | None = None
    duplicate: bool = False
    comment: str | None = None

    @property
    def ok(self) -> bool:
        """True for success."""
        return self.status == STATUS_SUCCESS

    @property
    def error_comment(self) -> str | None:
        """The Error Comment to answer with (``None`` on success)."""
        if self.ok:
            return None
        return self.comment or error_comment(self.reason or "refused")


class StoreService:
    """Store received instances durably and index them (see the module docstring).

    Parameters
    ----------
    spool : Spool
        Where files go.
    index : InstanceIndex
        Where they are recorded.
    watermark : DiskWatermark, optional
        Free-space floor; ``None`` disables the check.
    index_timeout_s : float
        How long a C-STORE waits for its commit before failing with 0xA702.
    max_batch : int
        Most instances per index transaction.
    max_instance_bytes : int
        Largest instance accepted; for Deflated Explicit VR Little Endian, its inflated
        size (counted as it streams, never held in memory) must be within it too.
    """

    def __init__(
        self,
        *,
        spool: Spool,
        index: InstanceIndex,
        watermark: DiskWatermark | None = None,
        index_timeout_s: float = 30.0,
        max_batch: int = 256,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    ) -> None:
        self.spool = spool
        self.max_instance_bytes = max_instance_bytes
        self.index = index
        self.watermark = watermark
        self.index_timeout_s = index_timeout_s
        self._committer: GroupCommitter[ReceivedInstance, IndexResult] = GroupCommitter(
            self._commit, max_batch=max_batch
        )
        self._flusher: ThreadPoolExecutor | None = None
        self._syncer_lock = threading.Lock()
        self._staged: dict[str, StagedFile] = {}
        self._staged_lock = threading.Lock()

    def _commit(self, records: list[ReceivedInstance]) -> Sequence[IndexResult]:
        # Nothing in ``records`` is acknowledged before both the files and the index are
        # durable. The files' flushes (I/O waits) run on a helper thread while this one
        # commits the index, so the waits overlap instead of adding up. Should the node die
        # in between, the index may name an instance whose file was not completely flushed:
        # it was not acknowledged, and recover() finds its slot's size or CRC-32 different
        # from the index's record and removes it; the sender's resend then writes the file
        # again (its final name does not exist) and is answered as a duplicate.
        paths = [record.spool_path for record in records]
        with self._staged_lock:
            staged = [self._staged.pop(path) for path in paths if path in self._staged]
        if not self.spool.durable:
            self.spool.finish(staged)
            return self.index.index_batch(records)
        with self._syncer_lock:
            if self._flusher is None:
                self._flusher = ThreadPoolExecutor(1, thread_name_prefix="spool-flush")
            flushed = self._flusher.submit(self.spool.finish, staged)
        try:
            results = self.index.index_batch(records)
        finally:
            flushed.result()  # a failed flush fails every C-STORE of the batch
        return results

    def recover(self) -> Recovery:
        """Complete or discard the files a crash left in the spool's slots.

        A slot holding data is an instance that was being received. If the index records
        it with the slot's size and CRC-32, it was acknowledged (or could have been): it
        gets its final name. Otherwise it was never acknowledged and is removed; its
        sender still has it and sends it again.
        """
        legacy = self.spool.recover()
        leftovers = self.spool.leftovers()
        uids = {slot: _sop_instance_uid(slot) for slot in leftovers}
        known = [uid for uid in uids.values() if uid]
        indexed = self.index.indexed_files(known) if known else {}
        completed = 0
        for slot, uid in uids.items():
            entry = indexed.get(uid) if uid else None
            if entry is not None and (
                self.spool.exists(entry.spool_path) or _file_matches(slot, entry)
            ):
                self.spool.adopt(slot, entry.spool_path)
                completed += 1
                continue
            self.spool.drop(slot)
            if entry is not None:
                LOGGER.warning(
                    "SOP Instance %s is indexed but its file was not completely written "
                    "when the node stopped; it was never acknowledged and is stored when "
                    "its sender sends it again",
                    uid,
                )
        recovery = Recovery(completed=completed, discarded=len(leftovers) - completed + legacy)
        if leftovers or legacy:
            LOGGER.info(
                "spool recovery after a crash: %d acknowledged files completed, "
                "%d unacknowledged partial files removed",
                recovery.completed,
                recovery.discarded,
            )
        return recovery

    def close(self) -> None:
        """Stop the helper threads and make every stored file's name durable.

        Call it after the last C-STORE; a later C-STORE starts them again.
        """
        with self._syncer_lock:
            flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.shutdown(wait=True)
        self.spool.close()

    def store(self, request: StoreRequest) -> StoreResult:
        """Run the pipeline for one instance and return the status to answer with."""
        size = len(request.dataset)
        if self.watermark is not None:
            reason = self.watermark.check(size)
            if reason:
                return StoreResult(
                    STATUS_DISK_FULL,
                    reason,
                    comment=error_comment("free disk space below the watermark"),
                )

        if size > self.max_instance_bytes:
            return too_large(size, self.max_instance_bytes)
        try:
            header = parse_header(request.dataset, request.transfer_syntax_uid)
            if request.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
                # what reads it later inflates it whole: a bomb must stop here
                inflated_size(request.dataset, self.max_instance_bytes)
        except InflateLimitError:
            return too_large(None, self.max_instance_bytes)
        except (HeaderError, InflateError) as exc:
            return StoreResult(
                STATUS_BAD_DATASET,
                str(exc),
                comment=error_comment("cannot parse data set", _detail(str(exc))),
            )
        if header.sop_class_uid != request.sop_class_uid:
            return StoreResult(
                STATUS_SOP_CLASS_MISMATCH,
                f"data set SOP Class {header.sop_class_uid} differs from the request's "
                f"{request.sop_class_uid}",
                comment=error_comment("SOP Class of data set differs from request"),
            )
        if header.sop_instance_uid != request.sop_instance_uid:
            return StoreResult(
                STATUS_BAD_DATASET,
                f"data set SOP Instance UID {header.sop_instance_uid} differs from the "
                f"request's {request.sop_instance_uid}",
                comment=error_comment("SOP Instance UID of data set differs from request"),
            )

        relative = self.spool.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        wrote = False
        if not self.spool.exists(relative):  # a file under its final name is complete
            meta = encode_file_meta(
                sop_class_uid=request.sop_class_uid,
                sop_instance_uid=request.sop_instance_uid,
                transfer_syntax_uid=request.transfer_syntax_uid,
                implementation_class_uid=DAFNE_IMPLEMENTATION_UID,
                implementation_version_name=DAFNE_IMPLEMENTATION_VERSION,
                source_ae_title=request.calling_ae,
            )
            try:
                staged = self.spool.stage(relative, (meta, request.dataset))
            except SpoolError as exc:
                status = STATUS_DISK_FULL if exc.errno == errno.ENOSPC else STATUS_SPOOL_FAILED
                # the errno's own words: the SpoolError's message starts with the path
                cause = os.strerror(exc.errno) if exc.errno else "spool write failed"
                return StoreResult(
                    status,
                    f"spool write failed: {exc}",
                    comment=error_comment(cause, "spool write failed"),
                )
            size, crc = staged.size, staged.crc32
            with self._staged_lock:
                previous = self._staged.pop(relative, None)
                self._staged[relative] = staged
            if previous is not None:  # the same instance arriving twice at once
                self.spool.discard(previous)
            wrote = True
        else:
            size, crc = self.spool.path(relative).stat().st_size, None

        record = _record(request, header, relative, size, crc)
        try:
            result = self._committer.commit(record, self.index_timeout_s)
        except CommitTimeoutError:
            return StoreResult(
                STATUS_INDEX_FAILED,
                f"index write timed out after {self.index_timeout_s:g} s",
                comment=error_comment("index write timed out", "database busy or down"),
            )
        except Exception as exc:
            LOGGER.warning(
                "indexing %s failed: %s: %s", request.sop_instance_uid, type(exc).__name__, exc
            )
            return StoreResult(
                STATUS_INDEX_FAILED,
                f"index write failed: {type(exc).__name__}: {exc}",
                comment=error_comment("index write failed", type(exc).__name__),
            )

        if result.duplicate and wrote and result.spool_path != relative:
            # same SOP Instance UID filed under another study/series: keep the first copy
            LOGGER.warning(
                "SOP Instance %s already stored as %s; discarding the copy at %s",
                request.sop_instance_uid,
                result.spool_path,
                relative,
            )
            try:
                self.spool.path(relative).unlink()
            except OSError as exc:
                LOGGER.warning("cannot remove %s: %s", relative, exc)
        return StoreResult(STATUS_SUCCESS, duplicate=result.duplicate)


def _detail(message: str) -> str:
    """A header error's message without the prefix the comment's reason already says."""
    for prefix in ("cannot parse dataset: ", "cannot read dataset attributes: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _sop_instance_uid(path: Path) -> str | None:
    """The SOP Instance UID in a spooled file's meta information (``None`` if unreadable)."""
    try:
        uid = read_file_meta_info(path).get("MediaStorageSOPInstanceUID")
    except Exception:  # a partially written file: pydicom raises many types
        return None
    return str(uid) if uid else None


def _file_matches(path: Path, entry: IndexedFile) -> bool:
    """Whether the file at ``path`` is exactly what the index recorded."""
    if entry.content_crc32 is None or path.stat().st_size != entry.size_bytes:
        return False
    return zlib.crc32(path.read_bytes()) == entry.content_crc32


def _record(
    request: StoreRequest, header: InstanceHeader, relative: str, size: int, crc: int | None
) -> ReceivedInstance:
    return ReceivedInstance(
        **{name: getattr(header, name) for name in _HEADER_FIELDS},
        transfer_syntax_uid=request.transfer_syntax_uid,
        spool_path=relative,
        size_bytes=size,
        received_at=datetime.now(UTC),
        calling_ae=request.calling_ae,
        called_ae=request.called_ae,
        peer_address=request.peer_address,
        content_crc32=crc,
    )
