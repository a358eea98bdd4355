"""``/jobs``: list and inspect jobs, and retry a failed one.

Retrying goes through :func:`dafne_node.jobs.retry_job`, the same transition that
``dafne-node jobs retry`` uses, so the API and the command line can never disagree on what
a retry does.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status
from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload, selectinload

from dafne_node.api.deps import SessionDep
from dafne_node.api.schemas import ErrorResponse, JobDetail, JobList, JobSummary
from dafne_node.jobs import JobError, retry_job
from db.node_models import Job, JobKind, JobState, Series

__all__ = ["router"]

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

_MAX_ID = 2**63 - 1  # BIGINT: larger ids cannot exist, and PostgreSQL would raise on them
JobId = Annotated[int, Path(ge=1, le=_MAX_ID, description="the job's id")]
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such job"}}


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    kind: Annotated[JobKind | None, Query(description="only jobs of this kind")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobList:
    """Jobs, newest first, optionally filtered by state and kind (paged)."""
    conditions = []
    if state is not None:
        conditions.append(Job.state == state)
    if kind is not None:
        conditions.append(Job.kind == kind)
    total = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
    rows = session.execute(
        select(Job, Series.series_instance_uid)
        .outerjoin(Series, Job.series_id == Series.id)
        .where(*conditions)
        .order_by(Job.id.desc())
        .limit(limit)
        .offset(offset)
    )
    items = [JobSummary.from_row(job, series_uid) for job, series_uid in rows]
    return JobList(total=int(total), limit=limit, offset=offset, items=items)


def _load_job(session: Session, job_id: int) -> Job | None:
    """The job with its series, study and outbox, read fresh from the database."""
    return session.scalar(
        select(Job)
        .where(Job.id == job_id)
        .options(
            joinedload(Job.series).joinedload(Series.study),
            selectinload(Job.outbox),
        )
        .execution_options(populate_existing=True)
    )


@router.get("/{job_id}", response_model=JobDetail, responses=_NOT_FOUND)
def get_job(job_id: JobId, session: SessionDep) -> JobDetail:
    """One job with its series, error, result and outbox items."""
    job = _load_job(session, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id}")
    return JobDetail.from_job(job)


@router.post(
    "/{job_id}/retry",
    response_model=JobDetail,
    responses={
        **_NOT_FOUND,
        409: {"model": ErrorResponse, "description": "the job has not failed"},
    },
)
def retry(job_id: JobId, session: SessionDep) -> JobDetail:
    """Put a failed job back to work (see :func:`dafne_node.jobs.retry_job`); 409 otherwise."""
    try:
        retry_job(session, job_id)
    except JobError as error:
        session.rollback()
        if session.get(Job, job_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id}") from error
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(error)) from error
    session.commit()
    LOGGER.info("job %d retried through the admin API", job_id, extra={"job_id": job_id})
    job = _load_job(session, job_id)
    if job is None:  # deleted between commit and read: report what is true now
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id}")
    return JobDetail.from_job(job)
