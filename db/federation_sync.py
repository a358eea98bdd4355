"""The sync client's tables: the upload outbox and the sync state of the federation model.

``federation_uploads`` is an outbox like ``outbox`` for DICOM: a row per weight delta,
created in the transaction that registers the accepted local model, so a delta is never
trained without being queued, nor queued twice. ``federation_sync`` holds one row per
federation model with what the client last saw and a lease, so that of several node
processes sharing a database only one talks to the server at a time (two would send the
same update twice and race over the error-feedback residual).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from db.base import dialect_insert, utcnow
from db.node_models import FederationSync, FederationUpload, UploadState

__all__ = [
    "continued_upload_key",
    "due_uploads",
    "enqueue_upload",
    "new_idempotency_key",
    "release_sync_leases",
    "sync_state",
    "take_lease",
    "upload_counts",
]


def new_idempotency_key() -> str:
    """A random key in the server's alphabet (``[A-Za-z0-9._:-]``).

    Random, so that it says nothing about the node, the patient or the files.
    """
    return f"dafne-{uuid.uuid4().hex}"


def enqueue_upload(session: Session, *, delta_path: Path, base_generation: int,
                   local_round: int, now: datetime | None = None) -> FederationUpload:
    """Queue the delta file at ``delta_path`` for upload (once: a second call returns the row).

    Parameters
    ----------
    session:
        The session of the transaction that registers the run's model.
    delta_path:
        The delta file of the accepted run (stored resolved, for any working directory).
    base_generation, local_round:
        The root generation the delta is against and the local round it describes.
    now:
        The time the upload is due from (now by default).
    """
    path = str(delta_path.resolve())
    existing = session.scalars(
        select(FederationUpload).where(FederationUpload.delta_path == path)).first()
    if existing is not None:
        return existing
    now = now or utcnow()
    row = FederationUpload(delta_path=path, idempotency_key=new_idempotency_key(),
                           base_generation=base_generation, local_round=local_round,
                           state=UploadState.PENDING, attempts=0, next_attempt_at=now,
                           created_at=now, updated_at=now)
    session.add(row)
    session.flush()
    return row


def continued_upload_key(session: Session, *, base_generation: int,
                         up_to_round: int) -> str | None:
    """Idempotency key of the upload a cumulative delta continues, or None.

    A run that fine-tuned local round ``up_to_round`` (against ``base_generation``) contains
    the delta of every earlier local round against that generation; the newest of those
    with an upload the server did not refuse is the one the server can follow the chain
    from (:mod:`federation.lineage`). None if there is none (the federation was off, or
    every such upload was refused).
    """
    return session.scalar(
        select(FederationUpload.idempotency_key)
        .where(FederationUpload.base_generation == base_generation,
               FederationUpload.local_round <= up_to_round,
               FederationUpload.state != UploadState.REFUSED)
        .order_by(FederationUpload.local_round.desc()).limit(1))


def due_uploads(session: Session, now: datetime, *, limit: int = 16) -> list[int]:
    """Ids of pending uploads due at ``now``, oldest due first."""
    return list(session.scalars(
        select(FederationUpload.id)
        .where(FederationUpload.state == UploadState.PENDING,
               FederationUpload.next_attempt_at <= now)
        .order_by(FederationUpload.next_attempt_at, FederationUpload.id).limit(limit)))


def upload_counts(session: Session) -> dict[str, int]:
    """Uploads by state; every :class:`UploadState` is present, with 0 if none."""
    counts = {state.value: 0 for state in UploadState}
    for state, count in session.execute(
            select(FederationUpload.state, func.count()).group_by(FederationUpload.state)):
        counts[UploadState(state).value] = int(count)
    return counts


def sync_state(session: Session, model: str, *, lock: bool = False) -> FederationSync:
    """The sync row of ``model``, created empty if missing (``lock``: FOR UPDATE)."""
    session.execute(dialect_insert(session, FederationSync)
                    .values(model=model, updated_at=utcnow())
                    .on_conflict_do_nothing(index_elements=["model"]))
    query = select(FederationSync).where(FederationSync.model == model)
    if lock:
        query = query.with_for_update()
    return session.scalars(query).one()


def release_sync_leases(session: Session, owners: Sequence[str]) -> int:
    """Free the sync leases held by ``owners`` (dead processes); returns how many were held.

    Why: a node killed while it synced would otherwise block its own restart from syncing
    until the lease ran out (minutes).
    """
    if not owners:
        return 0
    result = session.execute(
        update(FederationSync).where(FederationSync.lease_owner.in_(list(owners)))
        .values(lease_owner=None, lease_until=None)
        .execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]


def take_lease(session: Session, model: str, owner: str, *, now: datetime,
               duration: timedelta) -> bool:
    """Hold (or renew) the right to sync ``model`` until ``now + duration``.

    One conditional UPDATE: it succeeds when nobody holds the lease, the lease ran out, or
    ``owner`` holds it already. Returns whether ``owner`` holds it now.
    """
    sync_state(session, model)
    result = session.execute(
        update(FederationSync)
        .where(FederationSync.model == model,
               or_(FederationSync.lease_owner.is_(None), FederationSync.lease_owner == owner,
                   FederationSync.lease_until.is_(None), FederationSync.lease_until < now))
        .values(lease_owner=owner, lease_until=now + duration)
        .execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]
