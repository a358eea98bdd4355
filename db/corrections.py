"""The ``corrections`` table: record what became of each SEG a viewer sent back.

Every change of a correction's state after it was recorded is checked against
``db.node_models.CORRECTION_TRANSITIONS`` here, so a trained example cannot become queued
again and a rejected SEG cannot be trained on by a bug elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.base import dialect_insert, utcnow
from db.node_models import (
    CORRECTION_TRANSITIONS,
    Correction,
    CorrectionState,
    Job,
    JobKind,
)

__all__ = [
    "REPLACEABLE",
    "correction_counts",
    "is_known",
    "is_node_seg",
    "list_corrections",
    "move",
    "new_example_count",
    "record",
    "supersede_older",
]

REPLACEABLE = (CorrectionState.QUEUED, CorrectionState.TRAINED, CorrectionState.CONFIRMED)
"""States a newer correction of the same series supersedes."""


def is_node_seg(session: Session, sop_instance_uid: str) -> bool:
    """Whether the node itself made this SEG instance (an echo from PACS, not a correction)."""
    return session.scalar(
        select(Job.id).where(Job.result_sop_instance_uid == sop_instance_uid).limit(1)
    ) is not None


def is_known(session: Session, sop_instance_uid: str) -> bool:
    """Whether this SEG instance was already examined (a resend changes nothing)."""
    return session.scalar(
        select(Correction.id).where(Correction.seg_sop_instance_uid == sop_instance_uid)
    ) is not None


def record(session: Session, **fields: Any) -> Correction | None:
    """Insert a correction; None if its SEG instance is already recorded (idempotent)."""
    now = utcnow()
    values = {"labels": [], "unmapped": [], "dice": {}, "changed_slices": [], **fields,
              "created_at": now, "updated_at": now}
    values["state"] = CorrectionState(values["state"]).value
    correction_id = session.scalar(
        dialect_insert(session, Correction).values(values)
        .on_conflict_do_nothing(index_elements=["seg_sop_instance_uid"])
        .returning(Correction.id)
    )
    return None if correction_id is None else session.get(Correction, correction_id)


def move(correction: Correction, to: CorrectionState, *, reason: str | None = None) -> None:
    """Change a correction's state, checked against the transition table.

    Raises
    ------
    ValueError
        If the table does not allow the change.
    """
    current = CorrectionState(correction.state)
    if to not in CORRECTION_TRANSITIONS[current]:
        raise ValueError(f"correction {correction.id} cannot go from {current.value} to "
                         f"{to.value}")
    correction.state = to
    if reason is not None:
        correction.reason = reason


def supersede_older(session: Session, newer: Correction) -> list[Correction]:
    """Mark older corrections of ``newer``'s source series superseded; return them."""
    if newer.source_series_id is None:
        return []
    older = list(session.scalars(
        select(Correction)
        .where(Correction.source_series_id == newer.source_series_id,
               Correction.id < newer.id, Correction.state.in_(REPLACEABLE))
        .with_for_update()
    ))
    for correction in older:
        move(correction, CorrectionState.SUPERSEDED,
             reason=f"superseded by correction {newer.id}")
        correction.superseded_by_id = newer.id
    return older


def correction_counts(session: Session) -> dict[str, int]:
    """How many corrections are in each state (every state present, zeros included)."""
    counts = dict.fromkeys((state.value for state in CorrectionState), 0)
    for state, count in session.execute(
        select(Correction.state, func.count()).group_by(Correction.state)
    ):
        counts[CorrectionState(state).value] = int(count)
    return counts


def list_corrections(session: Session, *, limit: int = 100,
                     states: Sequence[CorrectionState] = ()) -> list[Correction]:
    """The newest corrections first, optionally only those in ``states``."""
    query = select(Correction).order_by(Correction.id.desc()).limit(limit)
    if states:
        query = query.where(Correction.state.in_(list(states)))
    return list(session.scalars(query))


def new_example_count(session: Session) -> tuple[int, int]:
    """Examples queued since the last training run was queued, and the newest one's id.

    A run records the newest correction it was queued for (``max_correction_id``); what
    arrived after it is new, so a rejected run's examples do not trigger the next run alone.
    """
    last = session.scalars(
        select(Job).where(Job.kind == JobKind.TRAIN).order_by(Job.id.desc()).limit(1)
    ).first()
    since = int(last.payload.get("max_correction_id", 0)) if last is not None else 0
    count, newest = session.execute(
        select(func.count(), func.max(Correction.id))
        .where(Correction.state == CorrectionState.QUEUED, Correction.id > since,
               Correction.example_path.is_not(None))
    ).one()
    return int(count), int(newest or since)
