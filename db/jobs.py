"""Job queue primitives on the ``jobs`` table: enqueue, claim, heartbeat, recover.

This is the data layer only; the node's job logic (what each kind does, retries, the state
transitions after ``running``) lives in ``dafne_node/jobs.py`` and calls these.

Claiming is one statement on both databases::

    UPDATE jobs SET state='running', claimed_by=…, attempts=attempts+1, …
     WHERE id = (SELECT id FROM jobs WHERE state='queued' AND kind IN (…) AND due
                 ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED)
       AND state = 'queued'
    RETURNING …

On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets several workers claim different jobs at the
same time without waiting on each other. SQLite has no row locks (SQLAlchemy drops the
clause) but runs every transaction under ``BEGIN IMMEDIATE`` (see :mod:`db.session`), so
the statement is atomic; the ``state='queued'`` re-check keeps it correct either way.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from db.base import dialect_insert, utcnow
from db.node_models import Job, JobKind, JobState

CLAIM = (JobState.QUEUED, JobState.RUNNING)
"""The state change :func:`claim_next_job` makes (in ``JOB_TRANSITIONS``, tested)."""
TAKE_OVER = (JobState.RUNNING, JobState.QUEUED)
"""The state change :func:`requeue_stale_jobs` makes (in ``JOB_TRANSITIONS``, tested)."""

__all__ = [
    "active_job",
    "claim_job",
    "claim_next_job",
    "enqueue_job",
    "heartbeat",
    "requeue_stale_jobs",
]


def enqueue_job(
    session: Session,
    *,
    kind: JobKind | str,
    series_id: int | None = None,
    series_revision: int | None = None,
    model_name: str | None = None,
    payload: dict[str, Any] | None = None,
    priority: int = 0,
    not_before: datetime | None = None,
    supersedes_id: int | None = None,
) -> Job | None:
    """Queue a job; return it, or ``None`` if this (kind, series, revision) already exists.

    The uniqueness of ``(kind, series_id, series_revision)`` makes creating a series' job
    idempotent (an assembler that crashed after enqueueing and runs again adds nothing).
    Jobs without a series (``train``, ``sync``) are never deduplicated.
    """
    now = utcnow()
    values = {
        "kind": JobKind(kind).value,
        "state": JobState.QUEUED.value,
        "series_id": series_id,
        "series_revision": series_revision,
        "model_name": model_name,
        "payload": payload or {},
        "priority": priority,
        "attempts": 0,
        "not_before": not_before,
        "supersedes_id": supersedes_id,
        "created_at": now,
        "updated_at": now,
    }
    statement = dialect_insert(session, Job).values(values).returning(Job.id)
    if series_id is not None:
        statement = statement.on_conflict_do_nothing(
            index_elements=["kind", "series_id", "series_revision"]
        )
    job_id = session.scalar(statement)
    if job_id is None:
        return None
    return session.get(Job, job_id)


def claim_next_job(
    session: Session,
    kinds: Iterable[JobKind | str],
    worker_id: str,
    *,
    now: datetime | None = None,
) -> Job | None:
    """Claim the most urgent due job of one of ``kinds`` for ``worker_id``, or ``None``.

    The job is moved to ``running`` with ``attempts`` incremented and the claim recorded.
    Commit right after (the claim's row lock, on PostgreSQL, is held until then).
    Two concurrent callers never get the same job.
    """
    now = now or utcnow()
    kind_values = [JobKind(kind).value for kind in kinds]
    if not kind_values:
        return None
    candidate = (
        select(Job.id)
        .where(
            Job.state == CLAIM[0].value,
            Job.kind.in_(kind_values),
            or_(Job.not_before.is_(None), Job.not_before <= now),
        )
        .order_by(Job.priority.desc(), Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    statement = (
        update(Job)
        .where(Job.id == candidate, Job.state == CLAIM[0].value)
        .values(
            state=CLAIM[1].value,
            claimed_by=worker_id,
            claimed_at=now,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            updated_at=now,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    job_id = session.scalar(statement)
    if job_id is None:
        return None
    return session.get(Job, job_id, populate_existing=True)


def claim_job(session: Session, job_id: int, worker_id: str, *,
              now: datetime | None = None) -> Job | None:
    """Claim the queued job ``job_id`` for ``worker_id``; None if it is not queued.

    The same change as :func:`claim_next_job`, for a process that chose its job (IT's
    ``train --now``); None means another process took it first.
    """
    now = now or utcnow()
    claimed = session.scalar(
        update(Job)
        .where(Job.id == job_id, Job.state == CLAIM[0].value)
        .values(state=CLAIM[1].value, claimed_by=worker_id, claimed_at=now, heartbeat_at=now,
                attempts=Job.attempts + 1, updated_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return None if claimed is None else session.get(Job, claimed, populate_existing=True)


def active_job(session: Session, kind: JobKind) -> Job | None:
    """The oldest job of ``kind`` that is queued or running (a train job: the only one)."""
    return session.scalars(
        select(Job).where(Job.kind == kind, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        .order_by(Job.id).limit(1)
    ).first()


def heartbeat(session: Session, job_id: int, worker_id: str) -> bool:
    """Record that ``worker_id`` is still working on ``job_id``; False if it lost the job."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.claimed_by == worker_id,
            Job.state.in_([JobState.RUNNING.value, JobState.SENDING.value]),
        )
        .values(heartbeat_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def requeue_stale_jobs(
    session: Session,
    *,
    stale_after: timedelta,
    dead_workers: Collection[str] = (),
    now: datetime | None = None,
    kinds: Collection[JobKind] = (),
) -> int:
    """Put ``running`` jobs whose worker stopped heart-beating back in the queue.

    This is how a node killed mid-job resumes: at start (and periodically) the jobs of
    dead workers become ``queued`` again. ``dead_workers`` names workers known to be gone
    (a restarting node knows its own dead processes), whose jobs are requeued at once
    rather than after ``stale_after``. Jobs in ``sending`` are left to the outbox.

    ``kinds`` limits the take-over to those job kinds (a trainer takes back only its own).

    Returns
    -------
    int
        How many jobs were requeued.
    """
    now = now or utcnow()
    stale = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < now - stale_after)
    if dead_workers:
        stale = or_(stale, Job.claimed_by.in_(list(dead_workers)))
    conditions = [Job.state == TAKE_OVER[0].value, stale]
    if kinds:
        conditions.append(Job.kind.in_([JobKind(kind).value for kind in kinds]))
    result = session.execute(
        update(Job)
        .where(*conditions)
        .values(state=TAKE_OVER[1].value, claimed_by=None, claimed_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
