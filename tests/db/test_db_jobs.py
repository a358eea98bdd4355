"""The job table as a queue: idempotent enqueue, claims that never collide, recovery."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select

from db.base import utcnow
from db.jobs import claim_next_job, enqueue_job, heartbeat, requeue_stale_jobs
from db.node_models import Job, JobKind, JobState, Series
from db.repository import index_instances
from db.session import make_session_factory, session_scope
from tests.db.records import record


def _series_id(engine: Engine) -> int:
    with session_scope(engine) as session:
        index_instances(session, [record(1)])
        return session.scalars(select(Series.id)).one()


def test_enqueue_is_idempotent_per_series_revision(engine: Engine) -> None:
    series_id = _series_id(engine)
    with session_scope(engine) as session:
        first = enqueue_job(session, kind=JobKind.SEGMENT, series_id=series_id, series_revision=0)
        assert first is not None and first.state is JobState.QUEUED
        assert enqueue_job(session, kind="segment", series_id=series_id, series_revision=0) is None
        newer = enqueue_job(
            session, kind="segment", series_id=series_id, series_revision=1, supersedes_id=first.id
        )
        assert newer is not None and newer.supersedes_id == first.id
        # jobs without a series are never deduplicated
        assert enqueue_job(session, kind=JobKind.TRAIN) is not None
        assert enqueue_job(session, kind=JobKind.TRAIN) is not None
    with pytest.raises(ValueError), session_scope(engine) as session:
        enqueue_job(session, kind="bogus")


def test_claim_order_and_due_time(engine: Engine) -> None:
    now = utcnow()
    with session_scope(engine) as session:
        low = enqueue_job(session, kind="segment", payload={"n": 1})
        later = enqueue_job(session, kind="segment", not_before=now + timedelta(hours=1))
        high = enqueue_job(session, kind="segment", priority=5)
        other = enqueue_job(session, kind="train")
        assert low and later and high and other
    sessions = make_session_factory(engine)
    claimed = []
    for _ in range(3):
        with session_scope(sessions) as session:
            job = claim_next_job(session, [JobKind.SEGMENT], "worker-1", now=now)
            claimed.append(job.id if job else None)
            if job:
                assert job.state is JobState.RUNNING and job.attempts == 1
                assert job.claimed_by == "worker-1" and job.claimed_at is not None
    assert claimed == [high.id, low.id, None]  # the delayed one is not due yet
    with session_scope(sessions) as session:
        job = claim_next_job(session, ["segment"], "w", now=now + timedelta(hours=2))
        assert job is not None and job.id == later.id
        assert claim_next_job(session, [], "w") is None


def test_heartbeat_and_stale_requeue(engine: Engine) -> None:
    with session_scope(engine) as session:
        job = enqueue_job(session, kind="segment")
        assert job
    with session_scope(engine) as session:
        claimed = claim_next_job(session, ["segment"], "dead-worker")
        assert claimed is not None
    with session_scope(engine) as session:
        assert heartbeat(session, job.id, "dead-worker")
        assert not heartbeat(session, job.id, "someone-else")
    with session_scope(engine) as session:
        assert requeue_stale_jobs(session, stale_after=timedelta(minutes=5)) == 0
        later = utcnow() + timedelta(minutes=10)
        assert requeue_stale_jobs(session, stale_after=timedelta(minutes=5), now=later) == 1
    with session_scope(engine) as session:
        again = claim_next_job(session, ["segment"], "new-worker")
        assert again is not None and again.id == job.id and again.attempts == 2


def test_concurrent_claims_never_share_a_job(engine: Engine) -> None:
    total = 60
    with session_scope(engine) as session:
        for n in range(total):
            enqueue_job(session, kind="segment", payload={"n": n})
    sessions = make_session_factory(engine)
    barrier = threading.Barrier(3)
    claims: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        mine: list[int] = []
        try:
            barrier.wait()
            while True:
                with session_scope(sessions) as session:
                    job = claim_next_job(session, ["segment"], name)
                    if job is None:
                        break
                    mine.append(job.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        claims[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    everything = [job_id for mine in claims.values() for job_id in mine]
    assert len(everything) == total
    assert len(set(everything)) == total  # nobody got a job twice
    with session_scope(engine) as session:
        states = {job.state for job in session.query(Job)}
        assert states == {JobState.RUNNING}
