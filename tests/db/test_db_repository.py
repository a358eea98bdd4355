"""Indexing received instances: idempotent, batched, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import Engine, delete, func, select

from db.base import utcnow
from db.node_models import Instance, Series, SeriesState, Study
from db.repository import (
    SqlInstanceIndex,
    complete_quiet_series,
    count_instances,
    index_instance,
    index_instances,
)
from db.session import session_scope
from tests.db.records import record


def test_index_is_idempotent(engine: Engine) -> None:
    with session_scope(engine) as session:
        assert index_instance(session, record(1)) == "stored"
        assert index_instance(session, record(1)) == "duplicate"
    with session_scope(engine) as session:
        results = index_instances(session, [record(1), record(2), record(2), record(3)])
        assert [r.status for r in results] == ["duplicate", "stored", "duplicate", "stored"]
        assert results[0].spool_path == record(1).spool_path
    with session_scope(engine) as session:
        assert count_instances(session) == 3
        series = session.scalars(select(Series)).one()
        assert series.num_instances == 3
        assert series.size_bytes == 3000
        assert series.state is SeriesState.RECEIVING
        assert series.modality == "MR" and series.calling_ae == "MODALITY"
        assert session.scalar(select(func.count()).select_from(Study)) == 1


def test_duplicate_reports_the_path_on_record(engine: Engine) -> None:
    index = SqlInstanceIndex(engine)
    try:
        first = index.index_batch([record(7)])[0]
        # the same SOP Instance UID claimed by another series: the first copy wins
        moved = record(7, series="1.2.3.9", sop_instance_uid="1.2.3.1.7", spool_path="x.dcm")
        again = index.index_batch([moved])[0]
    finally:
        index.close()
    assert not first.duplicate
    assert again.duplicate and again.spool_path == first.spool_path


def test_batches_across_series_and_studies(engine: Engine) -> None:
    index = SqlInstanceIndex(engine)
    try:
        batch = [record(n, series=f"1.2.{n % 3}.1", study=f"1.2.{n % 3}") for n in range(30)]
        results = index.index_batch(batch)
        assert not any(r.duplicate for r in results)
        assert all(r.duplicate for r in index.index_batch(batch))
    finally:
        index.close()
    with session_scope(engine) as session:
        rows = session.execute(select(Series.series_instance_uid, Series.num_instances))
        counts = {uid: count for uid, count in rows}
        assert counts == {"1.2.0.1": 10, "1.2.1.1": 10, "1.2.2.1": 10}
        assert session.scalar(select(func.count()).select_from(Instance)) == 30


def test_late_instance_reopens_a_complete_series(engine: Engine) -> None:
    old = utcnow() - timedelta(seconds=60)
    with session_scope(engine) as session:
        index_instances(session, [record(n, received_at=old) for n in range(3)])
    with session_scope(engine) as session:
        done = complete_quiet_series(session, quiet_since=utcnow() - timedelta(seconds=10))
        assert [s.series_instance_uid for s in done] == ["1.2.3.1"]
        assert done[0].state is SeriesState.COMPLETE and done[0].revision == 0
        # nothing left to complete: a second assembler pass finds nothing
        assert complete_quiet_series(session, quiet_since=utcnow()) == []
    with session_scope(engine) as session:
        index_instances(session, [record(99)])
    with session_scope(engine) as session:
        series = session.scalars(select(Series)).one()
        assert series.state is SeriesState.RECEIVING
        assert series.revision == 1 and series.num_instances == 4
        assert series.completed_at is None
        assert series.last_received_at > old


def test_concurrent_indexers_store_each_instance_once(engine: Engine) -> None:
    # two receivers (e.g. two node processes) get the same instances at the same time
    barrier = threading.Barrier(2)
    outcomes: list[list[bool]] = []

    def run() -> None:
        index = SqlInstanceIndex(engine)
        try:
            barrier.wait()
            mine = []
            for n in range(20):
                mine += [r.duplicate for r in index.index_batch([record(n), record(n + 100)])]
            outcomes.append(mine)
        finally:
            index.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == 2
    stored = sum(not duplicate for mine in outcomes for duplicate in mine)
    assert stored == 40
    with session_scope(engine) as session:
        assert count_instances(session) == 40
        assert session.scalars(select(Series)).one().num_instances == 40


def test_indexed_files_give_what_crash_recovery_checks(engine: Engine) -> None:
    index = SqlInstanceIndex(engine)
    try:
        index.index_batch([record(1, content_crc32=0xFFFFFFFF, size_bytes=123), record(2)])
        found = index.indexed_files(["1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.99"])
    finally:
        index.close()
    assert set(found) == {"1.2.3.1.1", "1.2.3.1.2"}
    assert found["1.2.3.1.1"].content_crc32 == 0xFFFFFFFF  # all 32 bits survive
    assert found["1.2.3.1.1"].size_bytes == 123
    assert found["1.2.3.1.1"].spool_path == "1.2.3/1.2.3.1/1.2.3.1.1.dcm"
    assert found["1.2.3.1.2"].content_crc32 is None


def test_receiver_index_keeps_series_counters_and_reopens_series(engine: Engine) -> None:
    # the receiver's hot path: a new series takes a transaction, later batches one statement
    old = utcnow() - timedelta(seconds=60)
    index = SqlInstanceIndex(engine)
    try:
        index.index_batch([record(1, received_at=old)])
        index.index_batch([record(2, received_at=old, number_of_frames=4, size_bytes=500)])
        with session_scope(engine) as session:
            complete_quiet_series(session, quiet_since=utcnow() - timedelta(seconds=10))
        late = utcnow()
        results = index.index_batch([record(3, received_at=late), record(2)])
    finally:
        index.close()
    assert [r.duplicate for r in results] == [False, True]
    with session_scope(engine) as session:
        series = session.scalars(select(Series)).one()
        assert (series.num_instances, series.num_frames, series.size_bytes) == (3, 6, 2500)
        assert series.state is SeriesState.RECEIVING and series.revision == 1
        assert series.completed_at is None
        assert abs((series.last_received_at - late).total_seconds()) < 0.001
        assert count_instances(session) == 3
    # the pool got its connection back as it handed it out: transactions still roll back
    with engine.connect() as connection:
        connection.execute(delete(Instance))
        connection.rollback()
    with session_scope(engine) as session:
        assert count_instances(session) == 3
