"""Job life-cycle operations shared by workers, the CLI and the admin API.

A job is a row with a state (``db.node_models.JobState``); this module holds the
transitions that people trigger, so that ``dafne-node jobs retry`` and
``POST /jobs/{id}/retry`` do exactly the same thing. Claiming work is the data
layer's job (``db.jobs``) because it is dialect-specific SQL.
"""

from __future__ import annotations

import logging

from sqlalchemy import update
from sqlalchemy.orm import Session

from db.base import utcnow
from db.node_models import Job, JobState, OutboxItem, OutboxState

LOGGER = logging.getLogger(__name__)


class JobError(LookupError):
    """A job operation that cannot be done, with the reason (unknown id, wrong state)."""


def retry_job(session: Session, job_id: int) -> Job:
    """Put a failed job back to work.

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
        job.state = JobState.SENDING
    else:
        job.state = JobState.QUEUED
        job.attempts = 0
    job.error = None
    job.finished_at = None
    job.not_before = None
    job.claimed_by = None
    LOGGER.info("job %d retried by request: now %s", job_id, job.state.value,
                extra={"job_id": job_id})
    return job
