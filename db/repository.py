"""Recording received instances: idempotent, batched, the same on SQLite and PostgreSQL.

:func:`index_instances` inserts studies, series and instances with ``INSERT … ON CONFLICT
DO NOTHING`` (both databases have it), so a SOP Instance UID seen before, or seen twice in
one batch, is a no-op reported as a duplicate, and two processes indexing the same study at
once cannot collide. :class:`SqlInstanceIndex` wraps it as the receiver's index (one
transaction per batch) and remembers study and series row ids, so the common case (another
instance of a series already known) is two statements per batch.

Records are duck-typed (:class:`InstanceRecord`), so this module does not import the DICOM
layer; ``dicom_scp.store.ReceivedInstance`` is one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.orm import Session

from db.base import utcnow
from db.node_models import Instance, Series, SeriesState

__all__ = [
    "IndexResult",
    "IndexedFile",
    "InstanceRecord",
    "SqlInstanceIndex",
    "complete_quiet_series",
    "count_instances",
    "index_instance",
    "index_instances",
]

LOGGER = logging.getLogger(__name__)


class InstanceRecord(Protocol):
    """The attributes :func:`index_instances` reads from each record."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    spool_path: str
    size_bytes: int
    content_crc32: int | None
    received_at: datetime
    calling_ae: str
    called_ae: str | None
    peer_address: str | None
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    study_description: str | None
    image_type: str | None
    series_number: int | None
    instance_number: int | None
    number_of_frames: int | None
    patient_id: str | None
    study_date: str | None
    accession_number: str | None


@dataclass(frozen=True, slots=True)
class IndexedFile:
    """What the index recorded about an instance's spooled file."""

    spool_path: str
    size_bytes: int
    content_crc32: int | None


_LOOKUP_CHUNK = 500


@dataclass(frozen=True, slots=True)
class IndexResult:
    """The outcome for one record: added, or already there (``duplicate``)."""

    duplicate: bool
    spool_path: str
    """The spool path on record (the existing one for a duplicate)."""

    @property
    def status(self) -> str:
        """``"duplicate"`` or ``"stored"``."""
        return "duplicate" if self.duplicate else "stored"


def _clip(value: str | None, length: int) -> str | None:
    return value[:length] if value is not None else None


_STUDY_COLUMNS = (
    "study_instance_uid",
    "patient_id",
    "study_date",
    "accession_number",
    "study_description",
    "created_at",
    "updated_at",
)
_SERIES_COLUMNS = (
    "series_instance_uid",
    "study_id",
    "modality",
    "body_part_examined",
    "series_description",
    "series_number",
    "image_type",
    "sop_class_uid",
    "calling_ae",
    "peer_address",
    "state",
    "revision",
    "num_instances",
    "num_frames",
    "size_bytes",
    "first_received_at",
    "last_received_at",
    "created_at",
    "updated_at",
)
_INSTANCE_COLUMNS = (
    "series_id",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "instance_number",
    "number_of_frames",
    "image_type",
    "spool_path",
    "size_bytes",
    "content_crc32",
    "received_at",
    "calling_ae",
    "called_ae",
    "peer_address",
)


class _Sql:
    """Portable SQL for the hot path, run on the DBAPI connection.

    Why not SQLAlchemy statements: for a one-instance batch SQLAlchemy's execution
    machinery costs ~0.7 ms against ~0.05 ms for SQLite itself, and with one association
    that is on the critical path of every C-STORE. The SQL below is the same on SQLite and
    PostgreSQL (both have ``ON CONFLICT DO NOTHING`` and ``RETURNING``); only the parameter
    marker and the time representation differ, and on PostgreSQL the instances and their
    series counters go in one statement (:meth:`add_instances`), because there every
    statement is a network round trip. The schema itself is still defined by the ORM models
    and Alembic; tests run this against both databases.
    """

    def __init__(self, dialect: str) -> None:
        if dialect not in ("sqlite", "postgresql"):
            raise NotImplementedError(f"only SQLite and PostgreSQL are supported, not {dialect}")
        self.sqlite = dialect == "sqlite"
        self.mark = "?" if self.sqlite else "%s"

    def time(self, value: datetime) -> Any:
        """A bind value for a UTC time (SQLAlchemy's SQLite text format on SQLite)."""
        value = value.astimezone(UTC)
        if self.sqlite:
            return value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        return value

    def _marks(self, count: int) -> str:
        return ", ".join([self.mark] * count)

    def insert(self, table: str, columns: Sequence[str], rows: int, conflict: str) -> str:
        """INSERT of ``rows`` rows that skips rows conflicting on ``conflict``."""
        one = f"({self._marks(len(columns))})"
        return (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)} "
            f"ON CONFLICT ({conflict}) DO NOTHING"
        )

    def lookup(self, table: str, key: str, value: str, count: int) -> str:
        """SELECT key, value for ``count`` keys."""
        return f"SELECT {key}, {value} FROM {table} WHERE {key} IN ({self._marks(count)})"

    def add_instances(self, rows: int) -> str:
        """PostgreSQL: insert instances and add them to their series' counters at once.

        One statement, so with autocommit one round trip and one commit per batch (a
        transaction of INSERT, UPDATE and COMMIT is four round trips). The counters change
        as :meth:`update_series` changes them, and only the inserted SOP Instance UIDs are
        returned, as from the plain INSERT.
        """
        receiving = SeriesState.RECEIVING.value
        insert = self.insert("instances", _INSTANCE_COLUMNS, rows, "sop_instance_uid")
        return (
            f"WITH added AS ({insert} "
            "RETURNING sop_instance_uid, series_id, number_of_frames, size_bytes, received_at), "
            "totals AS (SELECT series_id, count(*) AS instances, "
            "sum(coalesce(number_of_frames, 1)) AS frames, sum(size_bytes) AS bytes, "
            "max(received_at) AS last FROM added GROUP BY series_id), "
            "counted AS (UPDATE series SET "
            "num_instances = series.num_instances + totals.instances, "
            "num_frames = series.num_frames + totals.frames, "
            "size_bytes = series.size_bytes + totals.bytes, "
            "last_received_at = GREATEST(series.last_received_at, totals.last), "
            f"revision = series.revision + CASE WHEN series.state <> '{receiving}' "
            "THEN 1 ELSE 0 END, "
            f"state = '{receiving}', state_reason = NULL, completed_at = NULL, "
            f"updated_at = {self.mark} FROM totals WHERE series.id = totals.series_id) "
            "SELECT sop_instance_uid FROM added"
        )

    def update_series(self) -> str:
        """Add instances to a series (and reopen it if it was complete or skipped)."""
        m = self.mark
        return (
            f"UPDATE series SET num_instances = num_instances + {m}, "
            f"num_frames = num_frames + {m}, size_bytes = size_bytes + {m}, "
            f"last_received_at = CASE WHEN last_received_at > {m} THEN last_received_at "
            f"ELSE {m} END, "
            f"revision = revision + CASE WHEN state <> '{SeriesState.RECEIVING.value}' "
            f"THEN 1 ELSE 0 END, "
            f"state = '{SeriesState.RECEIVING.value}', state_reason = NULL, completed_at = NULL, "
            f"updated_at = {m} WHERE id = {m}"
        )


_DIALECTS = {name: _Sql(name) for name in ("sqlite", "postgresql")}


def _sql_for(dialect: str) -> _Sql:
    sql = _DIALECTS.get(dialect)
    if sql is None:
        raise NotImplementedError(f"only SQLite and PostgreSQL are supported, not {dialect}")
    return sql


def _study_ids(cursor: Any, sql: _Sql, records: Sequence[InstanceRecord]) -> dict[str, int]:
    rows: dict[str, tuple[Any, ...]] = {}
    now = sql.time(utcnow())
    for record in records:
        if record.study_instance_uid not in rows:
            rows[record.study_instance_uid] = (
                record.study_instance_uid,
                _clip(record.patient_id, 64),
                _clip(record.study_date, 16),
                _clip(record.accession_number, 64),
                record.study_description,
                now,
                now,
            )
    return _insert_and_look_up(cursor, sql, "studies", rows, columns=_STUDY_COLUMNS,
                               key="study_instance_uid")


def _series_ids(
    cursor: Any, sql: _Sql, records: Sequence[InstanceRecord], study_ids: dict[str, int]
) -> dict[str, int]:
    rows: dict[str, tuple[Any, ...]] = {}
    for record in records:
        if record.series_instance_uid not in rows:
            received = sql.time(record.received_at)
            rows[record.series_instance_uid] = (
                record.series_instance_uid,
                study_ids[record.study_instance_uid],
                _clip(record.modality, 16),
                _clip(record.body_part_examined, 64),
                record.series_description,
                record.series_number,
                _clip(record.image_type, 128),
                record.sop_class_uid,
                _clip(record.calling_ae, 16),
                _clip(record.peer_address, 64),
                SeriesState.RECEIVING.value,
                0,
                0,
                0,
                0,
                received,
                received,
                received,
                received,
            )
    return _insert_and_look_up(cursor, sql, "series", rows, columns=_SERIES_COLUMNS,
                               key="series_instance_uid")


def _insert_and_look_up(cursor: Any, sql: _Sql, table: str, rows: dict[str, tuple[Any, ...]],
                        *, columns: Sequence[str], key: str) -> dict[str, int]:
    """Insert the rows whose ``key`` is new (one statement), then return every key's id.

    Rows already present are left as they are (``ON CONFLICT DO NOTHING``), so concurrent
    receivers of the same study or series end up with one row and the same id.
    """
    cursor.execute(
        sql.insert(table, columns, len(rows), key),
        [value for row in rows.values() for value in row],
    )
    cursor.execute(sql.lookup(table, key, "id", len(rows)), list(rows))
    return {uid: id_ for uid, id_ in cursor.fetchall()}


def _index(
    cursor: Any, sql: _Sql, records: Sequence[InstanceRecord], cache: dict[str, int]
) -> list[IndexResult]:
    unknown = [record for record in records if record.series_instance_uid not in cache]
    if unknown:
        cache.update(_series_ids(cursor, sql, unknown, _study_ids(cursor, sql, unknown)))

    first: dict[str, InstanceRecord] = {}
    for record in records:
        first.setdefault(record.sop_instance_uid, record)
    values: list[Any] = []
    for record in first.values():
        values += (
            cache[record.series_instance_uid],
            record.sop_instance_uid,
            record.sop_class_uid,
            record.transfer_syntax_uid,
            record.instance_number,
            record.number_of_frames,
            _clip(record.image_type, 128),
            record.spool_path,
            record.size_bytes,
            record.content_crc32,
            sql.time(record.received_at),
            _clip(record.calling_ae, 16),
            _clip(record.called_ae, 16),
            _clip(record.peer_address, 64),
        )
    now = sql.time(utcnow())
    if not sql.sqlite:
        cursor.execute(sql.add_instances(len(first)), [*values, now])
        inserted = {row[0] for row in cursor.fetchall()}
        return _results(records, first, inserted, _paths_on_record(cursor, sql, first, inserted))
    cursor.execute(
        sql.insert("instances", _INSTANCE_COLUMNS, len(first), "sop_instance_uid")
        + " RETURNING sop_instance_uid",
        values,
    )
    inserted = {row[0] for row in cursor.fetchall()}
    existing = _paths_on_record(cursor, sql, first, inserted)

    totals: dict[int, list[Any]] = {}
    for uid in inserted:
        record = first[uid]
        entry = totals.setdefault(cache[record.series_instance_uid], [0, 0, 0, record.received_at])
        entry[0] += 1
        entry[1] += record.number_of_frames or 1
        entry[2] += record.size_bytes
        entry[3] = max(entry[3], record.received_at)
    for series_id, (count, frames, size, last) in totals.items():
        last_value = sql.time(last)
        cursor.execute(
            sql.update_series(), (count, frames, size, last_value, last_value, now, series_id)
        )
    return _results(records, first, inserted, existing)


def _paths_on_record(
    cursor: Any, sql: _Sql, first: dict[str, InstanceRecord], inserted: set[str]
) -> dict[str, str]:
    """The spool paths already indexed for the records that were not inserted."""
    duplicates = [uid for uid in first if uid not in inserted]
    if not duplicates:
        return {}
    cursor.execute(
        sql.lookup("instances", "sop_instance_uid", "spool_path", len(duplicates)), duplicates
    )
    return {uid: path for uid, path in cursor.fetchall()}


def _results(
    records: Sequence[InstanceRecord],
    first: dict[str, InstanceRecord],
    inserted: set[str],
    existing: dict[str, str],
) -> list[IndexResult]:
    results: list[IndexResult] = []
    claimed: set[str] = set()
    for record in records:
        uid = record.sop_instance_uid
        if uid in inserted and uid not in claimed:
            claimed.add(uid)
            results.append(IndexResult(duplicate=False, spool_path=record.spool_path))
        else:
            path = existing.get(uid) or first[uid].spool_path
            results.append(IndexResult(duplicate=True, spool_path=path))
    return results


def index_instances(
    session: Session | Connection,
    records: Sequence[InstanceRecord],
    *,
    known_series: dict[str, int] | None = None,
) -> list[IndexResult]:
    """Record ``records`` (instances, their series and studies) in the current transaction.

    Idempotent: an instance whose SOP Instance UID is already indexed, or appears earlier
    in ``records``, is not added and is reported as a duplicate. Each series that gains
    instances gets its counters and ``last_received_at`` updated; a series that had been
    completed or skipped goes back to ``receiving`` with its ``revision`` incremented.

    Parameters
    ----------
    session : Session or Connection
        On SQLite or PostgreSQL; the caller commits.
    records : sequence of InstanceRecord
        What was received (see :class:`InstanceRecord`).
    known_series : dict, optional
        A cache of Series Instance UID -> series row id. Series found in it are not
        looked up; new ones are added to it. Pass the same dict across calls.

    Returns
    -------
    list of IndexResult
        One per record, in order.
    """
    if not records:
        return []
    connection = session.connection() if isinstance(session, Session) else session
    sql = _sql_for(connection.dialect.name)
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        return _index(cursor, sql, records, known_series if known_series is not None else {})
    finally:
        cursor.close()


def index_instance(session: Session, record: InstanceRecord) -> str:
    """Record one instance; return ``"stored"`` or ``"duplicate"``."""
    return index_instances(session, [record])[0].status


class SqlInstanceIndex:
    """The receiver's index on a database: one committed transaction per batch.

    Implements the ``dicom_scp.store.InstanceIndex`` protocol. It keeps one DBAPI
    connection from the engine's pool (with the engine's SQLite pragmas) and drives its
    transactions directly, and must be called by one thread at a time, as the receiver's
    group commit guarantees. :meth:`close` returns the connection.
    """

    def __init__(self, engine: Engine, *, cache_size: int = 10_000) -> None:
        self.engine = engine
        self._sql = _sql_for(engine.dialect.name)
        self._raw: Any = None
        self._series: dict[str, int] = {}
        self._cache_size = cache_size

    def _commit(self, records: Sequence[InstanceRecord]) -> list[IndexResult]:
        if self._raw is None:
            self._raw = self.engine.raw_connection()
        raw = self._raw
        cursor = raw.cursor()
        try:
            if self._sql.sqlite:
                cursor.execute("BEGIN IMMEDIATE")
                results = _index(cursor, self._sql, records, self._series)
                cursor.execute("COMMIT")
                return results
            # Once the series are known, a batch is one statement (Sql.add_instances), so
            # it runs as its own transaction; a new study or series takes a transaction
            # of several statements, so that no series row is ever committed empty.
            raw.driver_connection.autocommit = all(
                record.series_instance_uid in self._series for record in records
            )
            results = _index(cursor, self._sql, records, self._series)
            raw.commit()
            return results
        except BaseException:
            try:
                raw.rollback()
            except Exception:
                self.close()  # the connection is broken; reconnect on the next batch
            raise
        finally:
            try:
                cursor.close()
            except Exception:
                LOGGER.debug("closing a cursor of a broken connection", exc_info=True)

    def index_batch(self, records: Sequence[InstanceRecord]) -> list[IndexResult]:
        """Record ``records`` in one committed transaction."""
        if len(self._series) > self._cache_size:
            self._series.clear()
        try:
            return self._commit(records)
        except Exception as exc:
            if not _is_integrity_error(exc):
                raise
            # a cached series row was deleted meanwhile (e.g. by retention): look up again
            self._series.clear()
            return self._commit(records)

    def indexed_files(self, sop_instance_uids: Sequence[str]) -> dict[str, IndexedFile]:
        """The file recorded for each of these SOP Instance UIDs that is indexed.

        Read by the receiver's crash recovery to tell complete spool files from partial
        ones; it runs once at start, so it goes through SQLAlchemy, not the hot path.
        """
        found: dict[str, IndexedFile] = {}
        uids = list(sop_instance_uids)
        with self.engine.connect() as connection:
            for start in range(0, len(uids), _LOOKUP_CHUNK):
                rows = connection.execute(
                    select(
                        Instance.sop_instance_uid,
                        Instance.spool_path,
                        Instance.size_bytes,
                        Instance.content_crc32,
                    ).where(Instance.sop_instance_uid.in_(uids[start : start + _LOOKUP_CHUNK]))
                )
                for uid, path, size, crc in rows:
                    found[uid] = IndexedFile(spool_path=path, size_bytes=size, content_crc32=crc)
        return found

    def close(self) -> None:
        """Return the connection to the pool (as the pool handed it out: no autocommit)."""
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                if not self._sql.sqlite:
                    raw.driver_connection.autocommit = False
                raw.close()
            except Exception:
                LOGGER.debug("closing a broken index connection", exc_info=True)


def _is_integrity_error(exc: BaseException) -> bool:
    # DBAPI exceptions are module specific; both sqlite3 and psycopg name it so
    return type(exc).__name__ in ("IntegrityError", "ForeignKeyViolation")


def complete_quiet_series(
    session: Session, *, quiet_since: datetime, limit: int = 100
) -> list[Series]:
    """Mark ``receiving`` series with no instance since ``quiet_since`` as ``complete``.

    Each series is switched with a conditional UPDATE, so an instance indexed at the same
    moment (which sets the series back to ``receiving``) and several assemblers running
    at once are both safe: a series is returned by exactly one caller per revision.

    Returns
    -------
    list of Series
        The series this call completed (at their current revision).
    """
    candidates = session.scalars(
        select(Series.id)
        .where(
            Series.state == SeriesState.RECEIVING.value,
            Series.last_received_at < quiet_since,
        )
        .order_by(Series.last_received_at)
        .limit(limit)
    ).all()
    completed: list[Series] = []
    now = utcnow()
    for series_id in candidates:
        changed = session.execute(
            update(Series)
            .where(
                Series.id == series_id,
                Series.state == SeriesState.RECEIVING.value,
                Series.last_received_at < quiet_since,
            )
            .values(state=SeriesState.COMPLETE.value, completed_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if changed.rowcount == 1:  # type: ignore[attr-defined]
            series = session.get(Series, series_id, populate_existing=True)
            if series is not None:
                completed.append(series)
    return completed


def count_instances(session: Session) -> int:
    """How many instances are indexed."""
    return int(session.scalar(select(func.count()).select_from(Instance)) or 0)
