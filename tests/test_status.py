"""``dafne_node.status``: the node's snapshot on an empty and a populated database.

Runs on an SQLite file and on PostgreSQL (a throw-away schema per test session, skipped with
the reason when the server is unreachable). ``populate`` is also used by the API tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.status import NodeStatus, collect_status, format_status
from db.migrate import upgrade
from db.node_models import (
    Instance,
    Job,
    JobKind,
    JobState,
    NodeBase,
    OutboxItem,
    OutboxState,
    Series,
    SeriesState,
    Study,
)
from db.session import make_engine, make_session_factory, session_scope
from tests.postgres import PG_URL, temporary_schema

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MODEL = ("dafne-leg", 3)
PACS = "PACS@10.0.0.5:104"
ARCHIVE = "ARCHIVE@archive.local:11112"


# -- databases -----------------------------------------------------------------------------


def sqlite_database(path: Path) -> tuple[Engine, sessionmaker[Session]]:
    """A migrated SQLite database file (the node's default)."""
    engine = make_engine(path)
    upgrade(engine)
    return engine, make_session_factory(engine)


@pytest.fixture(scope="session")
def pg_engine() -> Iterator[Engine]:
    """A migrated, throw-away PostgreSQL schema for this test session."""
    with temporary_schema("t_status") as schema:
        engine = make_engine(PG_URL, schema=schema)
        try:
            upgrade(engine)
            yield engine
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A session factory on an empty, migrated node database of each backend."""
    if request.param == "sqlite":
        engine, sessions = sqlite_database(tmp_path / "node.db")
        yield sessions
        engine.dispose()
        return
    engine: Engine = request.getfixturevalue("pg_engine")
    tables = ", ".join(table.name for table in NodeBase.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield make_session_factory(engine)


# -- a small but complete node history -----------------------------------------------------


@dataclass(frozen=True)
class Populated:
    """Ids of the rows :func:`populate` created, by role."""

    done_job: int
    failed_before_seg: int
    failed_while_sending: int
    queued_job: int
    sending_job: int


def _series(study: Study, uid: str, state: SeriesState, n: int, last: datetime,
            **extra: Any) -> Series:
    return Series(study=study, series_instance_uid=uid, modality="MR", state=state,
                  num_instances=n, first_received_at=last - timedelta(seconds=20),
                  last_received_at=last, **extra)


def _instances(series: Series, n: int) -> list[Instance]:
    return [
        Instance(series=series, sop_instance_uid=f"{series.series_instance_uid}.{i}",
                 sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                 transfer_syntax_uid="1.2.840.10008.1.2.1",
                 spool_path=f"spool/{series.series_instance_uid}/{i}.dcm", size_bytes=1000,
                 received_at=series.last_received_at, calling_ae="MODALITY1")
        for i in range(n)
    ]


def _outbox(job: Job, address_of: str, state: OutboxState, **extra: Any) -> OutboxItem:
    ae_title, address = address_of.split("@")
    host, port = address.rsplit(":", 1)
    return OutboxItem(job=job, ae_title=ae_title, host=host, port=int(port),
                      path=f"out/{job.id}.dcm", sop_instance_uid=f"2.25.{job.id}.{port}",
                      state=state, **extra)


def populate(session: Session, now: datetime = NOW) -> Populated:
    """Two studies, four series (one skipped, one still receiving), five jobs, four outbox items.

    Expected: 8 instances; series receiving 1, complete 2, skipped 1; jobs queued 1,
    sending 1, done 1, failed 2; outbox sent 1, failed 1, pending 2, all to two destinations.
    """
    study_a = Study(study_instance_uid="1.2.3.1")
    study_b = Study(study_instance_uid="1.2.3.2")
    s1 = _series(study_a, "1.2.3.1.1", SeriesState.COMPLETE, 3, now - timedelta(hours=2),
                 completed_at=now - timedelta(hours=2))
    s2 = _series(study_a, "1.2.3.1.2", SeriesState.SKIPPED, 2, now - timedelta(hours=1),
                 series_description="Localizer", calling_ae="MODALITY1",
                 state_reason="no routing rule matched", completed_at=now - timedelta(minutes=59))
    s3 = _series(study_b, "1.2.3.2.1", SeriesState.RECEIVING, 1, now - timedelta(seconds=30))
    s4 = _series(study_b, "1.2.3.2.2", SeriesState.COMPLETE, 2, now - timedelta(hours=3))
    session.add_all([study_a, study_b, s1, s2, s3, s4])
    for series in (s1, s2, s3, s4):
        session.add_all(_instances(series, series.num_instances))
    done = Job(kind=JobKind.SEGMENT, state=JobState.DONE, series=s1, series_revision=0,
               attempts=1, result_sop_instance_uid="2.25.1", finished_at=now - timedelta(hours=2))
    failed = Job(kind=JobKind.SEGMENT, state=JobState.FAILED, series=s4, series_revision=0,
                 attempts=3, updated_at=now - timedelta(minutes=10),
                 finished_at=now - timedelta(minutes=10),
                 error="Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                       "RuntimeError: CUDA out of memory")
    queued = Job(kind=JobKind.TRAIN, state=JobState.QUEUED)
    sending_failed = Job(kind=JobKind.SEGMENT, state=JobState.FAILED, series=s1,
                         series_revision=1, attempts=1, result_sop_instance_uid="2.25.4",
                         error="delivery to PACS failed after 5 attempts",
                         updated_at=now - timedelta(minutes=1),
                         finished_at=now - timedelta(minutes=1))
    sending = Job(kind=JobKind.SEGMENT, state=JobState.SENDING, series=s4, series_revision=1,
                  attempts=1, result_sop_instance_uid="2.25.5")
    session.add_all([done, failed, queued, sending_failed, sending])
    session.flush()
    session.add_all([
        _outbox(done, PACS, OutboxState.SENT, attempts=1, sent_at=now - timedelta(hours=2)),
        _outbox(sending_failed, PACS, OutboxState.FAILED, attempts=5,
                last_error="association rejected: called AE title not recognised",
                created_at=now - timedelta(minutes=30), updated_at=now - timedelta(minutes=1)),
        _outbox(sending, PACS, OutboxState.PENDING, attempts=2, last_error="connection refused",
                created_at=now - timedelta(minutes=5), updated_at=now - timedelta(minutes=4)),
        _outbox(sending, ARCHIVE, OutboxState.PENDING, destination="archive",
                created_at=now - timedelta(minutes=5), updated_at=now - timedelta(minutes=5)),
    ])
    session.flush()
    return Populated(done.id, failed.id, sending_failed.id, queued.id, sending.id)


def populated_factory(sessions: sessionmaker[Session]) -> Populated:
    """Populate the database behind ``sessions`` and commit."""
    with session_scope(sessions) as session:
        return populate(session)


def _status(sessions: sessionmaker[Session], **kwargs: Any) -> NodeStatus:
    with session_scope(sessions) as session:
        return collect_status(session, model_name=MODEL[0], model_generation=MODEL[1],
                              now=NOW, **kwargs)


# -- tests ---------------------------------------------------------------------------------


def test_empty_database(factory: sessionmaker[Session]) -> None:
    status = _status(factory)
    assert status.instances_received == 0
    assert status.studies == 0
    assert status.jobs == dict.fromkeys(["queued", "running", "sending", "done", "failed",
                                         "skipped"], 0)
    assert status.series == {"receiving": 0, "complete": 0, "skipped": 0}
    assert status.outbox.states == {"pending": 0, "sending": 0, "sent": 0, "failed": 0,
                                    "cancelled": 0}
    assert status.outbox.destinations == []
    assert status.model.name == "dafne-leg"
    assert status.model.generation == 3
    assert status.last_received_at is None
    assert status.skipped_series == []
    assert status.failed_jobs == []
    text_out = format_status(status)
    assert "nothing received yet" in text_out
    assert "Nothing needs attention." in text_out
    assert "dafne-leg, generation 3" in text_out


def test_populated_database(factory: sessionmaker[Session]) -> None:
    ids = populated_factory(factory)
    status = _status(factory)
    assert status.instances_received == 8
    assert status.studies == 2
    assert status.series == {"receiving": 1, "complete": 2, "skipped": 1}
    assert status.jobs == {"queued": 1, "running": 0, "sending": 1, "done": 1, "failed": 2,
                           "skipped": 0}
    assert status.jobs_by_kind["segment"]["failed"] == 2
    assert status.jobs_by_kind["train"]["queued"] == 1
    assert sum(status.jobs_by_kind["sync"].values()) == 0
    assert status.outbox.states == {"pending": 2, "sending": 0, "sent": 1, "failed": 1,
                                    "cancelled": 0}
    assert status.last_received_at == NOW - timedelta(seconds=30)

    pacs, archive = status.outbox.destinations
    assert (pacs.destination, pacs.pending, pacs.failed, pacs.max_attempts) == (PACS, 1, 1, 5)
    assert pacs.oldest_at == NOW - timedelta(minutes=30)
    assert pacs.last_error == "association rejected: called AE title not recognised"
    assert (archive.destination, archive.name, archive.pending) == (ARCHIVE, "archive", 1)
    assert archive.last_error is None

    (skipped,) = status.skipped_series
    assert skipped.series_instance_uid == "1.2.3.1.2"
    assert skipped.series_description == "Localizer"
    assert skipped.calling_ae == "MODALITY1"
    assert skipped.reason == "no routing rule matched"
    assert skipped.at == NOW - timedelta(minutes=59)

    assert [job.id for job in status.failed_jobs] == [ids.failed_while_sending,
                                                      ids.failed_before_seg]
    newest = status.failed_jobs[1]
    assert (newest.kind, newest.series_instance_uid, newest.attempts) == ("segment",
                                                                          "1.2.3.2.2", 3)
    assert newest.error is not None and "CUDA out of memory" in newest.error


def test_json_has_the_documented_keys(factory: sessionmaker[Session]) -> None:
    populated_factory(factory)
    data = json.loads(_status(factory).model_dump_json())
    assert data["instances_received"] == 8
    assert data["jobs"]["failed"] == 2
    assert data["model"] == {"name": "dafne-leg", "generation": 3, "version": "g3"}
    assert data["corrections"]["queued"] == 0
    assert {"window_open_until", "next_window_at", "waiting_examples", "new_examples",
            "current_run", "last_run"} <= set(data["training"])
    assert data["outbox"]["destinations"][0]["destination"] == PACS


def test_recent_limits_the_lists(factory: sessionmaker[Session]) -> None:
    ids = populated_factory(factory)
    status = _status(factory, recent=1)
    assert [job.id for job in status.failed_jobs] == [ids.failed_while_sending]
    assert len(status.skipped_series) == 1
    assert _status(factory, recent=0).failed_jobs == []


def _count_statements(engine: Engine, action: Callable[[], object]) -> list[str]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return statements


def test_a_fixed_number_of_grouped_queries(tmp_path: Path) -> None:
    """Counting does not load rows: the same few queries, however much was received."""
    engine, sessions = sqlite_database(tmp_path / "node.db")
    empty = _count_statements(engine, lambda: _status(sessions))
    populated_factory(sessions)
    full = _count_statements(engine, lambda: _status(sessions))
    engine.dispose()
    assert len(full) == len(empty) + 1  # + the last-error query once a destination exists
    assert len(full) <= 16  # received, jobs, outbox, model, corrections, training
    instance_queries = [s for s in full if "FROM instances" in s]
    assert instance_queries and all("count(" in s.lower() for s in instance_queries)


def test_format_status_answers_the_operator(factory: sessionmaker[Session]) -> None:
    ids = populated_factory(factory)
    out = format_status(_status(factory))
    assert "Receiving: yes, last instance 30 s ago (2025-03-01 11:59:30 UTC)" in out
    assert "Received:  8 instances in 4 series of 2 studies" in out
    assert "Needs attention:" in out
    assert "2 failed job(s)" in out
    assert (f"{PACS}: 1 pending, 0 sending, 1 failed, up to 5 attempts, "
            "oldest queued 30 min ago") in out
    assert f"{ARCHIVE} (archive): 1 pending, 0 sending, 0 failed, oldest queued 5 min ago" in out
    assert "last error: association rejected: called AE title not recognised" in out
    assert (f"#{ids.failed_before_seg} segment, series 1.2.3.2.2, 3 attempt(s), "
            "failed 10 min ago") in out
    assert "error: RuntimeError: CUDA out of memory" in out  # a traceback's last line
    assert '1.2.3.1.2 "Localizer" (MR, 2 instances) from MODALITY1, 59 min ago' in out
    assert "reason: no routing rule matched" in out


def test_idle_node_says_so(tmp_path: Path) -> None:
    engine, sessions = sqlite_database(tmp_path / "node.db")
    populated_factory(sessions)
    with session_scope(sessions) as session:
        status = collect_status(session, model_name="m", model_generation=0,
                                now=NOW + timedelta(hours=1))
    engine.dispose()
    expected = "Receiving: idle, last instance 1 h 0 min ago (2025-03-01 11:59:30 UTC)"
    assert expected in format_status(status)


def test_naive_now_is_rejected(tmp_path: Path) -> None:
    engine, sessions = sqlite_database(tmp_path / "node.db")
    with session_scope(sessions) as session, pytest.raises(ValueError, match="timezone"):
        collect_status(session, model_name="m", model_generation=0,
                       now=datetime(2025, 1, 1))  # naive on purpose
    engine.dispose()
