"""Series assembly: a series is complete once no instance arrived for a quiet period.

DICOM has no "end of series" message, so, like mercure and Orthanc's stable
series, the node waits until a series has been quiet for
``assembly.quiet_period_s`` and then routes it once: a segmentation job, a
correction job for a SEG that came back, or a skip with the reason. The index
reopens a completed series when a late instance arrives (``Series.revision``
goes up); the next pass then creates a job for the new revision that
supersedes the old one, so PACS gets one current SEG rather than two.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import NodeConfig
from dafne_node.inference.route import Correction, Segment, SeriesFacts, Skip, route_series
from db.base import utcnow
from db.jobs import enqueue_job
from db.node_models import Job, JobKind, Series, SeriesState
from db.repository import complete_quiet_series

LOGGER = logging.getLogger(__name__)

BATCH = 50
"""Series completed per transaction: bounded so a backlog never holds a long lock."""


class SeriesAssembler:
    """Completes quiet series and turns them into jobs.

    Safe to run in several processes on one database: a series is completed by
    exactly one caller per revision, and jobs are unique per series revision.
    """

    def __init__(self, session_factory: sessionmaker[Session], config: NodeConfig) -> None:
        self._sessions = session_factory
        self._config = config
        self._quiet = timedelta(seconds=config.assembly.quiet_period_s)

    def run_once(self, now: datetime | None = None) -> int:
        """Complete every series quiet since before ``now - quiet period``; return how many."""
        quiet_since = (now or utcnow()) - self._quiet
        with self._sessions() as session, session.begin():
            completed = complete_quiet_series(session, quiet_since=quiet_since, limit=BATCH)
            for series in completed:
                self._route(session, series)
            return len(completed)

    def _route(self, session: Session, series: Series) -> None:
        decision = route_series(
            _facts(series), self._config.routes, self._config.default_destination
        )
        log_fields = {"series_uid": series.series_instance_uid, "revision": series.revision}
        if isinstance(decision, Skip):
            series.state = SeriesState.SKIPPED
            series.state_reason = decision.reason
            LOGGER.info("series %s skipped: %s", series.series_instance_uid, decision.reason,
                        extra=log_fields)
            return
        kind = JobKind.SEGMENT if isinstance(decision, Segment) else JobKind.CORRECTION
        previous = session.scalars(
            select(Job.id).where(Job.kind == kind, Job.series_id == series.id,
                                 Job.series_revision < series.revision)
            .order_by(Job.series_revision.desc()).limit(1)
        ).first()
        job = enqueue_job(
            session,
            kind=kind,
            series_id=series.id,
            series_revision=series.revision,
            model_name=decision.model if isinstance(decision, Segment) else None,
            payload=(
                {"route": decision.route, "destinations": list(decision.destinations)}
                if isinstance(decision, Segment) else {}
            ),
            supersedes_id=previous,
        )
        if job is None:
            return  # made by an earlier pass that crashed before committing the series
        if isinstance(decision, Correction):
            series.state_reason = f"SEG kept for correction handling (job {job.id})"
        LOGGER.info("series %s complete (%d instances): %s job %d", series.series_instance_uid,
                    series.num_instances, kind.value, job.id,
                    extra={**log_fields, "job_id": job.id})


def _facts(series: Series) -> SeriesFacts:
    return SeriesFacts(
        calling_ae=series.calling_ae or "",
        modality=series.modality or "",
        sop_class_uid=series.sop_class_uid or "",
        body_part=series.body_part_examined or "",
        series_description=series.series_description or "",
        image_type=tuple(series.image_type.split("\\")) if series.image_type else (),
        instance_count=series.num_frames or series.num_instances,
    )
