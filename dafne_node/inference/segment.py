"""Segment jobs: a complete image series becomes a SEG queued for delivery to PACS.

Each step is durable before the next begins, so a worker killed at any moment
leaves a job that a restart finishes: the SEG's UIDs derive from the series and
its revision, so running a job twice writes the same SEG and the outbox (unique
per SOP Instance UID and destination) sends it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import ConfigError, NodeConfig
from dafne_node.dicom.files import save_dataset_atomically
from dafne_node.dicom.series import InputError, read_series
from dafne_node.inference.segmenter import ModelSource, SegmentationResult
from dafne_node.jobs import lifecycle
from dafne_node.jobs.runner import ClaimedJob
from db.base import dialect_insert, utcnow
from db.node_models import (
    JOB_TRANSITIONS,
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Series,
)

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentedJob:
    """What a finished segmentation produced, for logs and tests."""

    job_id: int
    seg_path: Path
    sop_instance_uid: str
    destinations: tuple[str, ...]


class SegmentHandler:
    """Runs segment jobs with one loaded model (the runner's handler for ``segment``).

    Parameters
    ----------
    session_factory:
        Sessions on the node database.
    config:
        Destinations, data directory and spool location.
    models:
        The model to use: the node's active model (switched when another is activated),
        or a fixed one.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        config: NodeConfig,
        models: ModelSource,
    ) -> None:
        self._sessions = session_factory
        self._config = config
        self._models = models

    @property
    def results_dir(self) -> Path:
        """Where SEGs are kept until (and after) delivery."""
        return self._config.node.data_dir / "results"

    def handle(self, claimed: ClaimedJob) -> SegmentedJob | None:
        """Segment the job's series; the SEG written and queued, or None if there is none.

        Unexpected errors are raised for the runner to retry; a series that cannot be
        segmented fails its job at once with the reason.
        """
        job_id = claimed.id
        with self._sessions() as session, session.begin():
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                return None
            revision = job.series_revision or 0
            series = session.get(Series, job.series_id) if job.series_id else None
            if series is None:
                lifecycle.fail(job, "the series of this job no longer exists")
                return None
            if series.revision > revision:
                lifecycle.skip(job, _superseded_by_revision(series.revision))
                return None
            series_uid = series.series_instance_uid
            paths = [
                self._config.spool_dir / relative for relative in session.scalars(
                    select(Instance.spool_path).where(Instance.series_id == series.id)
                    .order_by(Instance.id)
                )
            ]
            destinations = tuple(job.payload.get("destinations", []))
        LOGGER.info("job %d: segmenting series %s (%d instances)", job_id, series_uid,
                    len(paths), extra={"job_id": job_id, "series_uid": series_uid})
        try:
            result = self._segment(paths, revision)
        except InputError as exc:
            self._fail(claimed, str(exc))
            return None
        seg_path = self.results_dir / series_uid / f"{result.seg.SOPInstanceUID}.dcm"
        save_dataset_atomically(result.seg, seg_path)
        self._queue_delivery(claimed, result, seg_path, destinations)
        return SegmentedJob(job_id, seg_path, result.seg.SOPInstanceUID, destinations)

    def _segment(self, paths: list[Path], revision: int) -> SegmentationResult:
        present = [path for path in paths if path.exists()]
        if len(present) < len(paths):
            # Indexed but never acknowledged: the node died before the file was flushed
            # and the sender has not resent it. Segment what was acknowledged.
            LOGGER.warning("%d of %d instances of the series have no spool file; "
                           "segmenting the %d that do", len(paths) - len(present), len(paths),
                           len(present))
        series, refusals = read_series(present)
        if refusals or len(series) != 1:
            reasons = "; ".join(str(refusal) for refusal in refusals) or "several series"
            raise InputError(f"spooled files are not one readable series: {reasons}")
        return self._models.current().segment_series(series[0], revision=revision)

    def _queue_delivery(self, claimed: ClaimedJob, result: SegmentationResult, seg_path: Path,
                        destinations: tuple[str, ...]) -> None:
        job_id, sop_uid = claimed.id, result.seg.SOPInstanceUID
        with self._sessions() as session, session.begin():
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING or job.claimed_by != claimed.worker_id:
                LOGGER.warning("job %d was taken from this worker; result dropped", job_id)
                return
            series = session.get(Series, job.series_id) if job.series_id else None
            if series is not None and series.revision > (job.series_revision or 0):
                # More instances arrived while this ran: the newer revision's job will
                # deliver a SEG of the whole series; this one must not reach PACS.
                lifecycle.skip(job, _superseded_by_revision(series.revision))
                return
            try:
                targets = [self._config.destination(name) for name in destinations]
            except ConfigError as exc:
                lifecycle.fail(job, f"cannot deliver: {exc}")
                return
            job.result_sop_instance_uid = sop_uid
            job.result = {
                "seg_path": str(seg_path),
                "precision": result.precision,
                "model": {"name": result.model_name, "generation": result.generation,
                          "version": result.model_version},
                "volumes_ml": {s.label.key: round(s.millilitres, 2) for s in result.structures},
                "timings_s": {key: round(value, 3) for key, value in result.timings.items()},
            }
            now = utcnow()
            for target in targets:  # a re-run after a crash queues nothing twice
                session.execute(
                    dialect_insert(session, OutboxItem)
                    .values(job_id=job_id, destination=target.name, ae_title=target.ae_title,
                            host=target.host, port=target.port, path=str(seg_path),
                            sop_instance_uid=sop_uid, sop_class_uid=result.seg.SOPClassUID,
                            state=OutboxState.PENDING, attempts=0, next_attempt_at=now,
                            created_at=now, updated_at=now)
                    .on_conflict_do_nothing(
                        index_elements=["sop_instance_uid", "ae_title", "host", "port"])
                )
            if targets:
                lifecycle.start_sending(job)
            else:
                lifecycle.finish(job)
            if job.supersedes_id is not None:
                _supersede(session, job.supersedes_id, job_id)
        LOGGER.info("job %d: SEG %s written, %d destination(s)", job_id, sop_uid, len(destinations),
                    extra={"job_id": job_id, "sop_instance_uid": sop_uid})

    def _fail(self, claimed: ClaimedJob, reason: str) -> None:
        with self._sessions() as session, session.begin():
            job = session.get(Job, claimed.id, with_for_update=True)
            if job is not None and job.state == JobState.RUNNING \
                    and job.claimed_by == claimed.worker_id:
                lifecycle.fail(job, reason)


def _superseded_by_revision(revision: int) -> str:
    return f"superseded: the series changed (now revision {revision})"


def _supersede(session: Session, old_job_id: int, new_job_id: int) -> None:
    """Stop delivering an older SEG of the same series: PACS should get the newest only."""
    old = session.get(Job, old_job_id, with_for_update=True)
    if old is None:
        return
    reason = f"superseded by job {new_job_id}"
    cancelled = session.execute(
        update(OutboxItem)
        .where(OutboxItem.job_id == old_job_id,
               OutboxItem.state.in_([OutboxState.PENDING, OutboxState.FAILED]))
        .values(state=OutboxState.CANCELLED, last_error=reason)
    ).rowcount
    if JobState.SKIPPED in JOB_TRANSITIONS[old.state]:  # not done, failed or skipped yet
        lifecycle.skip(old, reason)
    LOGGER.info("job %d %s (%d undelivered SEG copies cancelled)", old_job_id, reason, cancelled,
                extra={"job_id": old_job_id})
