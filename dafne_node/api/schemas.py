"""Response bodies of the admin API, separate from the ORM rows they are built from.

Why separate: the API is a contract with monitoring and scripts at the hospital, the tables
are an implementation detail that migrations change. Each schema is built explicitly from a
row (``from_row``), so a new column never leaks into a response by accident.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from dafne_node.status import NodeStatus
from db.node_models import Job, OutboxItem

__all__ = [
    "ErrorResponse",
    "HealthResponse",
    "JobDetail",
    "JobList",
    "JobSummary",
    "NodeStatus",
    "OutboxItemOut",
]


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer the routes raise themselves."""

    detail: str


class HealthResponse(BaseModel):
    """Liveness and readiness: 200 with ``ok``, or 503 with what is wrong."""

    status: str = Field(description="ok or unavailable")
    database: str = Field(description="ok or the reason it is unreachable")
    ready: bool
    detail: str | None = None


class JobSummary(BaseModel):
    """One job in a list."""

    id: int
    kind: str
    state: str
    series_instance_uid: str | None = None
    series_revision: int | None = None
    model_name: str | None = None
    attempts: int
    error: str | None = None
    result_sop_instance_uid: str | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None

    @classmethod
    def from_row(cls, job: Job, series_instance_uid: str | None) -> JobSummary:
        """Build from a job row and its series' UID (``None`` for jobs without a series)."""
        return cls(
            id=job.id,
            kind=job.kind.value,
            state=job.state.value,
            series_instance_uid=series_instance_uid,
            series_revision=job.series_revision,
            model_name=job.model_name,
            attempts=job.attempts,
            error=job.error,
            result_sop_instance_uid=job.result_sop_instance_uid,
            created_at=job.created_at,
            updated_at=job.updated_at,
            finished_at=job.finished_at,
        )


class JobList(BaseModel):
    """A page of jobs, newest first, with the number matching the filter."""

    total: int
    limit: int
    offset: int
    items: list[JobSummary]


class OutboxItemOut(BaseModel):
    """One file of a job to one destination, and how its delivery is going."""

    id: int
    destination: str = Field(description="AE@host:port")
    name: str | None = Field(default=None, description="configured destination name")
    sop_instance_uid: str
    sop_class_uid: str | None = None
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None = None
    last_status: int | None = Field(default=None, description="DIMSE status of the last try")
    sent_at: datetime | None = None

    @classmethod
    def from_row(cls, item: OutboxItem) -> OutboxItemOut:
        """Build from an outbox row (the file path on disk is not exposed)."""
        return cls(
            id=item.id,
            destination=f"{item.ae_title}@{item.host}:{item.port}",
            name=item.destination,
            sop_instance_uid=item.sop_instance_uid,
            sop_class_uid=item.sop_class_uid,
            state=item.state.value,
            attempts=item.attempts,
            next_attempt_at=item.next_attempt_at,
            last_error=item.last_error,
            last_status=item.last_status,
            sent_at=item.sent_at,
        )


class JobDetail(JobSummary):
    """One job with everything needed to understand it, including its outbox."""

    study_instance_uid: str | None = None
    series_description: str | None = None
    priority: int = 0
    not_before: datetime | None = None
    claimed_by: str | None = None
    claimed_at: datetime | None = None
    heartbeat_at: datetime | None = None
    supersedes_id: int | None = None
    payload: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    outbox: list[OutboxItemOut] = Field(default_factory=list)

    @classmethod
    def from_job(cls, job: Job) -> JobDetail:
        """Build from a job row with its series, study and outbox loaded."""
        series = job.series
        summary = JobSummary.from_row(job, series.series_instance_uid if series else None)
        return cls(
            **summary.model_dump(),
            study_instance_uid=series.study.study_instance_uid if series else None,
            series_description=series.series_description if series else None,
            priority=job.priority,
            not_before=job.not_before,
            claimed_by=job.claimed_by,
            claimed_at=job.claimed_at,
            heartbeat_at=job.heartbeat_at,
            supersedes_id=job.supersedes_id,
            payload=dict(job.payload or {}),
            result=job.result,
            outbox=[OutboxItemOut.from_row(item) for item in sorted(job.outbox, key=_by_id)],
        )


def _by_id(item: OutboxItem) -> int:
    return item.id
