"""Delivery of results: an outbox per destination with retries and exponential back-off.

PACS is sometimes down (maintenance, network); a SEG must arrive once it is
back, without anybody resending by hand. Each file and destination is a row
(``db.node_models.OutboxItem``): claimed, sent over one association per batch,
then marked sent or rescheduled after ``backoff_initial_s * 2**(attempts-1)``
(capped at ``backoff_max_s``). After ``max_attempts``, or at once when the peer
refuses the file in a way a resend cannot change (:attr:`SendResult.permanent`),
the item fails, its job fails with the reason, and ``dafne-node jobs retry`` puts
it back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import NodeConfig
from dafne_node.jobs import lifecycle
from db.base import utcnow
from db.node_models import Job, JobState, OutboxItem, OutboxState
from dicom_scp.sender import AssociationError, Destination, SendResult, send_files

LOGGER = logging.getLogger(__name__)

BATCH = 32
"""Files sent over one association at most."""

Sender = Callable[..., list[SendResult]]


class OutboxSender:
    """Sends due outbox items; safe to run in several processes on one database."""

    def __init__(self, session_factory: sessionmaker[Session], config: NodeConfig,
                 worker_id: str, *, send: Sender = send_files) -> None:
        self._sessions = session_factory
        self._config = config
        self._send = send
        self.worker_id = worker_id

    def run_once(self, now: datetime | None = None) -> int:
        """Send one batch of due items to one destination; return how many were tried."""
        claimed = self._claim(now or utcnow())
        if not claimed:
            return 0
        first = claimed[0]
        destination = Destination(first.ae_title, first.host, first.port)
        try:
            results = self._send([Path(item.path) for item in claimed], destination,
                                 calling_ae=self._config.dicom.ae_title)
            outcomes = {result.sop_instance_uid: result for result in results}
        except AssociationError as exc:
            outcomes = {}
            failure = str(exc)
        else:
            failure = "no result for this file"
        self._record(claimed, outcomes, failure)
        return len(claimed)

    def _claim(self, now: datetime) -> list[OutboxItem]:
        due = (OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= now)
        with self._sessions() as session, session.begin():
            oldest = session.execute(
                select(OutboxItem.ae_title, OutboxItem.host, OutboxItem.port)
                .where(*due).order_by(OutboxItem.next_attempt_at, OutboxItem.id).limit(1)
            ).first()
            if oldest is None:
                return []
            items = list(session.scalars(
                select(OutboxItem)
                .where(*due, OutboxItem.ae_title == oldest.ae_title,
                       OutboxItem.host == oldest.host, OutboxItem.port == oldest.port)
                .order_by(OutboxItem.id).limit(BATCH)
                .with_for_update(skip_locked=True)
            ))
            for item in items:
                item.state = OutboxState.SENDING
                item.claimed_by = self.worker_id
                item.claimed_at = now
                item.attempts += 1
            return items

    def _record(self, items: Sequence[OutboxItem], outcomes: dict[str | None, SendResult],
                failure: str) -> None:
        settings = self._config.sending
        now = utcnow()
        jobs: set[int] = set()
        with self._sessions() as session, session.begin():
            for claimed in items:
                item = session.get(OutboxItem, claimed.id, with_for_update=True)
                if item is None or item.state != OutboxState.SENDING:
                    continue
                result = outcomes.get(item.sop_instance_uid)
                item.claimed_by = None
                if result is not None and result.ok:
                    item.state = OutboxState.SENT
                    item.sent_at = now
                    item.last_status = result.status
                    item.last_error = None
                    LOGGER.info("sent %s to %s@%s:%d", item.sop_instance_uid, item.ae_title,
                                item.host, item.port, extra={"job_id": item.job_id})
                else:
                    item.last_status = result.status if result is not None else None
                    item.last_error = (result.error if result is not None else None) or failure
                    if result is not None and result.permanent:
                        item.state = OutboxState.FAILED
                        LOGGER.error("%s refused %s for good (status 0x%04X): %s",
                                     item.ae_title, item.sop_instance_uid, result.status,
                                     item.last_error, extra={"job_id": item.job_id})
                    elif item.attempts >= settings.max_attempts:
                        item.state = OutboxState.FAILED
                        LOGGER.error("giving up on %s to %s after %d attempts: %s",
                                     item.sop_instance_uid, item.ae_title, item.attempts,
                                     item.last_error, extra={"job_id": item.job_id})
                    else:
                        item.state = OutboxState.PENDING
                        item.next_attempt_at = now + backoff(
                            item.attempts, settings.backoff_initial_s, settings.backoff_max_s)
                        LOGGER.warning("sending %s to %s failed (attempt %d): %s; next at %s",
                                       item.sop_instance_uid, item.ae_title, item.attempts,
                                       item.last_error, item.next_attempt_at.isoformat(),
                                       extra={"job_id": item.job_id})
                if item.job_id is not None:
                    jobs.add(item.job_id)
            for job_id in jobs:
                settle_job(session, job_id)


def backoff(attempts: int, initial_s: float, max_s: float) -> timedelta:
    """Delay before the next attempt after ``attempts`` failures: doubling, capped."""
    return timedelta(seconds=min(initial_s * 2 ** max(attempts - 1, 0), max_s))


def settle_job(session: Session, job_id: int) -> None:
    """Mark a sending job done when all its files arrived, failed when one gave up."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.state != JobState.SENDING:
        return
    counts: dict[str, int] = {
        state: count for state, count in session.execute(
            select(OutboxItem.state, func.count()).where(OutboxItem.job_id == job_id)
            .group_by(OutboxItem.state)
        )
    }
    if counts.get(OutboxState.PENDING) or counts.get(OutboxState.SENDING):
        return
    if counts.get(OutboxState.FAILED):
        errors = session.scalars(select(OutboxItem.last_error).where(
            OutboxItem.job_id == job_id, OutboxItem.state == OutboxState.FAILED)).all()
        lifecycle.fail(job, "delivery failed: " + "; ".join(sorted({e or "unknown"
                                                                   for e in errors})))
    else:
        lifecycle.finish(job)


def requeue_interrupted_sends(
    session: Session, *, claimed_before: datetime, dead_workers: Collection[str] = ()
) -> int:
    """Make items that were being sent when a process died due again; return how many.

    An item counts as interrupted when it was claimed before ``claimed_before`` or by one
    of ``dead_workers``. The peer may have stored the file already; sending it again is
    harmless because the SOP Instance UID is the same and PACS keeps one copy.
    """
    interrupted = OutboxItem.claimed_at < claimed_before
    if dead_workers:
        interrupted = or_(interrupted, OutboxItem.claimed_by.in_(list(dead_workers)))
    result = session.execute(
        update(OutboxItem)
        .where(OutboxItem.state == OutboxState.SENDING, interrupted)
        .values(state=OutboxState.PENDING, claimed_by=None, next_attempt_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
