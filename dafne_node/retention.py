"""Retention: the spool, results and examples do not grow for ever, and nothing needed goes.

Hospital IT sets an age and, optionally, a size for the spool (``[retention]``). A pass
removes the spool files (and the node's SEGs) of series older than the age, then of the
oldest series while the spool is over the size. The rows stay, with ``files_removed_at``,
so the node still knows what it received, and a correction that arrives later for a
removed series is recorded as unusable with that reason. Never removed:

* a series still being received, or with a job queued, running or sending;
* a series a queued correction refers to (its example waits for training);
* a series a training run learned from, for ``keep_after_training_days`` after the run.

Training examples follow their correction: superseded, unusable and rejected ones are
never trained on and go at once; trained ones go ``keep_after_training_days`` after their
run (they are replayed by later runs until then).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import NodeConfig
from dafne_node.learning.examples import ExampleStore
from db.base import utcnow
from db.node_models import (
    Correction,
    CorrectionState,
    Instance,
    Job,
    JobKind,
    JobState,
    Series,
    SeriesState,
)

__all__ = ["RetentionReport", "apply_retention"]

LOGGER = logging.getLogger(__name__)

_BUSY = (JobState.QUEUED, JobState.RUNNING, JobState.SENDING)
_NEVER_TRAINED = (CorrectionState.SUPERSEDED, CorrectionState.UNUSABLE,
                  CorrectionState.REJECTED)


@dataclass(frozen=True)
class RetentionReport:
    """What one pass removed."""

    series: int
    bytes: int
    examples: int


def apply_retention(session_factory: sessionmaker[Session], config: NodeConfig,
                    now: datetime | None = None) -> RetentionReport:
    """Remove what ``[retention]`` says may go; return what was removed."""
    now = now or utcnow()
    settings = config.retention
    kept_since = now - timedelta(days=settings.keep_after_training_days)
    with session_factory() as session, session.begin():
        protected = _protected_series(session, kept_since)
        older_than = now - timedelta(days=settings.spool_max_age_days)
        removable = _removable(session, protected, older_than, settings.spool_max_gb)
        removed_bytes = sum(_remove_series(session, config, series, now) for series in removable)
        examples = _remove_examples(session, ExampleStore(config.node.data_dir), kept_since)
    if removable or examples:
        LOGGER.info("retention removed %d series (%.1f MiB) and %d training example(s)",
                    len(removable), removed_bytes / 2**20, examples)
    return RetentionReport(len(removable), removed_bytes, examples)


def _protected_series(session: Session, kept_since: datetime) -> set[int]:
    receiving = session.scalars(select(Series.id).where(Series.state == SeriesState.RECEIVING))
    busy = session.scalars(select(Job.series_id).where(Job.state.in_(_BUSY),
                                                       Job.series_id.is_not(None)))
    waiting = session.scalars(select(Correction.source_series_id).where(
        Correction.state == CorrectionState.QUEUED, Correction.source_series_id.is_not(None)))
    recently_trained = session.scalars(
        select(Correction.source_series_id)
        .join(Job, Job.id == Correction.trained_job_id)
        .where(Correction.state == CorrectionState.TRAINED, Job.finished_at >= kept_since,
               Correction.source_series_id.is_not(None)))
    return {int(i) for rows in (receiving, busy, waiting, recently_trained) for i in rows}


def _removable(session: Session, protected: set[int], older_than: datetime,
               max_gb: float | None) -> list[Series]:
    """Series past the age, then the oldest others while the spool is over its size."""
    sizes = dict(session.execute(
        select(Series.id, func.coalesce(func.sum(Instance.size_bytes), 0))
        .join(Instance, Instance.series_id == Series.id, isouter=True)
        .where(Series.files_removed_at.is_(None)).group_by(Series.id)).all())
    candidates = list(session.scalars(
        select(Series).where(Series.files_removed_at.is_(None))
        .order_by(Series.last_received_at, Series.id)))
    total = sum(int(size) for size in sizes.values())
    limit = None if max_gb is None else int(max_gb * 2**30)
    chosen = []
    for series in candidates:
        if series.id in protected:
            continue
        too_old = series.last_received_at < older_than
        too_big = limit is not None and total > limit
        if not (too_old or too_big):
            continue
        chosen.append(series)
        total -= int(sizes.get(series.id, 0))
    return chosen


def _remove_series(session: Session, config: NodeConfig, series: Series, now: datetime) -> int:
    """Delete the series' spool files and the node's SEGs of it; return the bytes freed."""
    freed = 0
    for relative, size in session.execute(select(Instance.spool_path, Instance.size_bytes)
                                          .where(Instance.series_id == series.id)):
        path = config.spool_dir / relative
        if path.exists():
            path.unlink()
            freed += int(size)
    for result in session.scalars(select(Job.result).where(
            Job.series_id == series.id, Job.kind == JobKind.SEGMENT, Job.result.is_not(None))):
        if result and result.get("seg_path"):
            Path(result["seg_path"]).unlink(missing_ok=True)
    series.files_removed_at = now
    LOGGER.info("retention: removed the files of series %s (last received %s)",
                series.series_instance_uid, series.last_received_at.isoformat(),
                extra={"series_uid": series.series_instance_uid})
    return freed


def _remove_examples(session: Session, store: ExampleStore, kept_since: datetime) -> int:
    stale = list(session.scalars(select(Correction).where(
        Correction.example_path.is_not(None), Correction.state.in_(_NEVER_TRAINED))))
    stale += list(session.scalars(
        select(Correction).join(Job, Job.id == Correction.trained_job_id)
        .where(Correction.example_path.is_not(None),
               Correction.state == CorrectionState.TRAINED, Job.finished_at < kept_since)))
    for correction in stale:
        assert correction.example_path is not None
        store.delete(correction.example_path)
        correction.example_path = None
    return len(stale)
