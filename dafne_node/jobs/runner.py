"""One runner for every job kind: claim a job, hand it to the handler for its kind.

Every process role runs the same loop over the one ``jobs`` table: the node's workers
register the segment and correction handlers, the trainer process the train handler. The
runner owns what is common to every kind: the claim (``db.jobs``), and what happens when a
handler raises something it did not expect (an out-of-memory, a native library's panic):
the job is retried after a delay, then failed with the reason, and the runner goes on with
the next job. A handler owns its own outcome otherwise, through the life cycle.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from dafne_node.jobs import lifecycle
from db.base import utcnow
from db.jobs import claim_next_job
from db.node_models import Job, JobKind, JobState

__all__ = ["MAX_ATTEMPTS", "RETRY_DELAY", "ClaimedJob", "JobHandler", "JobRunner",
           "worker_identity"]

LOGGER = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Attempts at an unexpected failure (e.g. out of memory) before a job is failed."""

RETRY_DELAY = timedelta(seconds=30)
"""Wait before the next attempt, times the attempts so far."""


def worker_identity(node_name: str) -> str:
    """``name@host:pid``, recorded in claimed jobs so a restart knows which were its own."""
    return f"{node_name}@{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ClaimedJob:
    """A job this runner holds: handlers check ``worker_id`` before committing results."""

    id: int
    kind: JobKind
    worker_id: str


class JobHandler(Protocol):
    """Does the work of one kind of job; returns what it made (for logs and tests)."""

    def handle(self, job: ClaimedJob) -> object:
        """Run ``job`` (state ``running``, claimed by ``job.worker_id``) to its outcome."""
        ...


class JobRunner:
    """Claims jobs of the kinds it has handlers for, most urgent first, one at a time.

    Parameters
    ----------
    session_factory:
        Sessions on the node database.
    handlers:
        The handler for each job kind this process runs.
    worker_id:
        Recorded in ``jobs.claimed_by``; unique per process (``name@host:pid``).
    clock:
        The current time, against which a job's ``not_before`` is due (tests drive it).
    """

    def __init__(self, session_factory: sessionmaker[Session],
                 handlers: Mapping[JobKind, JobHandler], worker_id: str, *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        if not handlers:
            raise ValueError("a job runner needs at least one handler")
        self._sessions = session_factory
        self._handlers = dict(handlers)
        self.worker_id = worker_id
        self._clock = clock

    @property
    def kinds(self) -> tuple[JobKind, ...]:
        """The job kinds this runner claims."""
        return tuple(self._handlers)

    def run_once(self) -> object | None:
        """Claim and run one job; its handler's result, or None when there was none."""
        with self._sessions() as session, session.begin():
            job = claim_next_job(session, self._handlers, self.worker_id, now=self._clock())
            if job is None:
                return None
            claimed = ClaimedJob(job.id, JobKind(job.kind), self.worker_id)
        return self.run_claimed(claimed)

    def run_claimed(self, claimed: ClaimedJob) -> object | None:
        """Run a job this runner's process claimed; its handler's result, or None."""
        try:
            return self._handlers[claimed.kind].handle(claimed)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # also a native library's panic (pyo3's PanicException)
            LOGGER.exception("job %d (%s) failed unexpectedly", claimed.id, claimed.kind.value,
                             extra={"job_id": claimed.id})
            self._retry_or_fail(claimed, f"{type(exc).__name__}: {exc}")
            return None

    def _retry_or_fail(self, claimed: ClaimedJob, reason: str) -> None:
        with self._sessions() as session, session.begin():
            job = session.get(Job, claimed.id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING or job.claimed_by != self.worker_id:
                return
            if job.attempts < MAX_ATTEMPTS:
                lifecycle.requeue(job, reason, not_before=utcnow() + RETRY_DELAY * job.attempts)
            else:
                lifecycle.fail(job, reason)
