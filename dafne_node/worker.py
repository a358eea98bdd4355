"""The segmentation worker: claims segment jobs, writes the SEG, queues its delivery.

Each step is durable before the next begins, so a worker killed at any moment
leaves a job that a restart finishes: the SEG's UIDs derive from the series and
its revision, so running a job twice writes the same SEG and the outbox (unique
per SOP Instance UID and destination) sends it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import ConfigError, NodeConfig
from dafne_node.dicomio import save_dataset_atomically
from dafne_node.jobs import lifecycle
from dafne_node.segmentation import SegmentationResult, SeriesSegmenter
from dafne_node.volume import InputError, read_series
from db.base import dialect_insert, utcnow
from db.jobs import claim_next_job
from db.node_models import (
    JOB_TRANSITIONS,
    Instance,
    Job,
    JobKind,
    JobState,
    OutboxItem,
    OutboxState,
    Series,
)

LOGGER = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Attempts at an unexpected failure (e.g. out of memory) before a job is failed."""

RETRY_DELAY = timedelta(seconds=30)


@dataclass(frozen=True)
class SegmentedJob:
    """What a finished segmentation produced, for logs and tests."""

    job_id: int
    seg_path: Path
    sop_instance_uid: str
    destinations: tuple[str, ...]


class SegmentationWorker:
    """Runs segment jobs one at a time with one loaded model.

    Parameters
    ----------
    session_factory:
        Sessions on the node database.
    config:
        Destinations, data directory and spool location.
    segmenter:
        The loaded model, shared with the rest of the process.
    worker_id:
        Recorded in ``jobs.claimed_by``; unique per process (host:pid).
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        config: NodeConfig,
        segmenter: SeriesSegmenter,
        worker_id: str,
    ) -> None:
        self._sessions = session_factory
        self._config = config
        self._segmenter = segmenter
        self.worker_id = worker_id

    @property
    def results_dir(self) -> Path:
        """Where SEGs are kept until (and after) delivery."""
        return self._config.node.data_dir / "results"

    def run_once(self) -> SegmentedJob | None:
        """Claim and run one segment job; None when there was nothing to do."""
        with self._sessions() as session, session.begin():
            job = claim_next_job(session, [JobKind.SEGMENT], self.worker_id)
            if job is None:
                return None
            job_id, revision = job.id, job.series_revision or 0
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
            seg_path = self.results_dir / series_uid / f"{result.seg.SOPInstanceUID}.dcm"
            save_dataset_atomically(result.seg, seg_path)
        except InputError as exc:
            self._finish_failed(job_id, str(exc), retry=False)
            return None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # also a native library's panic (pyo3's PanicException)
            LOGGER.exception("job %d: segmentation failed", job_id, extra={"job_id": job_id})
            self._finish_failed(job_id, f"{type(exc).__name__}: {exc}", retry=True)
            return None
        self._queue_delivery(job_id, result, seg_path, destinations)
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
        return self._segmenter.segment_series(series[0], revision=revision)

    def _queue_delivery(self, job_id: int, result: SegmentationResult, seg_path: Path,
                        destinations: tuple[str, ...]) -> None:
        sop_uid = result.seg.SOPInstanceUID
        with self._sessions() as session, session.begin():
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING or job.claimed_by != self.worker_id:
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
                "model": {"name": result.model_name, "generation": result.generation},
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

    def _finish_failed(self, job_id: int, reason: str, *, retry: bool) -> None:
        with self._sessions() as session, session.begin():
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING:
                return
            if retry and job.attempts < MAX_ATTEMPTS:
                lifecycle.requeue(job, reason, not_before=utcnow() + RETRY_DELAY * job.attempts)
            else:
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
