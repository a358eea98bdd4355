"""A job's life cycle: the only module that changes a job's state.

Every change is checked against the one transition table,
``db.node_models.JOB_TRANSITIONS``, for every kind of job (segment, correction, train,
sync); an illegal one raises :class:`IllegalTransitionError` instead of leaving a job in a
state nothing expects. Workers, the outbox, ``dafne-node jobs retry`` and
``POST /jobs/{id}/retry`` all come here, so each change sets the same fields and logs the
same line. Claiming a queued job and taking over a dead worker's are the data layer's
(``db.jobs``: dialect-specific SQL, checked against the same table).
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from db.base import utcnow
from db.node_models import JOB_TRANSITIONS, Job, JobState, OutboxItem, OutboxState

__all__ = [
    "IllegalTransitionError",
    "JobError",
    "fail",
    "finish",
    "pause",
    "requeue",
    "retry_job",
    "skip",
    "start_sending",
]

LOGGER = logging.getLogger(__name__)

_FINAL = frozenset(state for state, exits in JOB_TRANSITIONS.items() if not exits)


class JobError(LookupError):
    """A job operation that cannot be done, with the reason (unknown id, wrong state)."""


class IllegalTransitionError(RuntimeError):
    """A change of state the transition table does not allow (a bug, not bad input)."""


def _move(job: Job, to: JobState, *, error: str | None = None) -> None:
    current = JobState(job.state)
    if to not in JOB_TRANSITIONS[current]:
        raise IllegalTransitionError(
            f"job {job.id} ({job.kind}) cannot go from {current.value} to {to.value}"
        )
    job.state = to
    job.error = None if error is None else " ".join(error.split())  # also a log line
    job.finished_at = utcnow() if to in _FINAL or to == JobState.FAILED else None


def fail(job: Job, reason: str) -> None:
    """The job failed for good with ``reason`` (kept on one line: it is also a log line)."""
    _move(job, JobState.FAILED, error=reason)
    LOGGER.error("job %d failed: %s", job.id, job.error, extra={"job_id": job.id})


def skip(job: Job, reason: str) -> None:
    """The job is not needed any more (a newer revision of its series supersedes it)."""
    _move(job, JobState.SKIPPED, error=reason)
    LOGGER.info("job %d %s", job.id, reason, extra={"job_id": job.id})


def requeue(job: Job, reason: str, *, not_before: datetime) -> None:
    """Try the job again after an unexpected error, not before ``not_before``."""
    _move(job, JobState.QUEUED, error=reason)
    job.claimed_by = None
    job.not_before = not_before
    LOGGER.warning("job %d: attempt %d failed (%s); retrying", job.id, job.attempts,
                   job.error, extra={"job_id": job.id})


def pause(job: Job, reason: str, *, not_before: datetime | None) -> None:
    """Put a job that stopped cleanly back in the queue, to continue not before ``not_before``.

    A training run stopped at a step at the end of its window continues from its checkpoint.
    """
    _move(job, JobState.QUEUED, error=reason)
    job.claimed_by = None
    job.not_before = not_before
    LOGGER.info("job %d paused: %s", job.id, job.error, extra={"job_id": job.id})


def start_sending(job: Job) -> None:
    """The job's result is written and queued in the outbox."""
    _move(job, JobState.SENDING)


def finish(job: Job) -> None:
    """The job is done (its result delivered everywhere, or nowhere to deliver)."""
    _move(job, JobState.DONE)


def retry_job(session: Session, job_id: int) -> Job:
    """Put a failed job back to work (an operator's request).

    A job that failed while sending keeps its SEG: only its undelivered outbox
    items are made due again and the job waits in ``sending``. A job that failed
    before producing a SEG is queued again from scratch.

    Raises
    ------
    JobError
        If there is no such job or it has not failed.
    """
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise JobError(f"no job {job_id}")
    if job.state != JobState.FAILED:
        raise JobError(f"job {job_id} is {job.state.value}; only failed jobs can be retried")
    now = utcnow()
    undelivered = session.execute(
        update(OutboxItem)
        .where(OutboxItem.job_id == job_id, OutboxItem.state == OutboxState.FAILED)
        .values(state=OutboxState.PENDING, attempts=0, next_attempt_at=now, last_error=None)
    ).rowcount
    if job.result_sop_instance_uid and undelivered:
        _move(job, JobState.SENDING)
    else:
        _move(job, JobState.QUEUED)
        job.attempts = 0
    job.not_before = None
    job.claimed_by = None
    LOGGER.info("job %d retried by request: now %s", job_id, job.state.value,
                extra={"job_id": job_id})
    return job
