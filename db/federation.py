"""The federation server's tables: nodes and tokens, models, generations, updates, audit.

Every function takes a :class:`~sqlalchemy.orm.Session` and leaves the transaction to the
caller (commit or roll back), as :mod:`db.corrections` does. The statements that must hold
when several API replicas and aggregators run at once are single statements, atomic on
both databases:

- recording an upload is ``INSERT … ON CONFLICT (node_id, idempotency_key) DO NOTHING``,
  so a retried request cannot add a second update;
- the aggregation lock is one conditional ``UPDATE`` of the model's lease;
- assigning updates to a candidate is one ``UPDATE … WHERE state='pending' AND
  generation_id IS NULL``, so no update is aggregated twice.

On PostgreSQL a concurrent writer of the same row waits for the first to commit and then
re-checks the ``WHERE``; on SQLite every transaction holds the write lock from its start
(``BEGIN IMMEDIATE``, :mod:`db.session`).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from db.base import dialect_insert, utcnow
from db.fed_models import (
    FedAudit,
    FedGeneration,
    FedModel,
    FedNode,
    FedNodeModel,
    FedUpdate,
    GenerationState,
    UpdateState,
)

__all__ = [
    "MODEL_NAME",
    "NODE_NAME",
    "STATUS_LIMIT",
    "TOKEN_PREFIX",
    "FederationRepoError",
    "acquire_lease",
    "add_generation",
    "add_model",
    "add_node",
    "assign_updates",
    "audit",
    "federation_status",
    "find_update",
    "get_generation",
    "get_model",
    "get_node",
    "get_update",
    "hash_token",
    "insert_update_once",
    "latest_generation",
    "list_generations",
    "list_models",
    "list_nodes",
    "new_token",
    "node_for_token",
    "node_rights",
    "node_updates",
    "pending_summary",
    "pending_updates",
    "promote",
    "recent_audit",
    "refuse_update",
    "reject",
    "release_lease",
    "revoke_node",
    "set_rights",
    "supersede_update",
    "touch_node",
]

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A node's name (matched whole)."""
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""A federation model's slug (matched whole), e.g. ``leg``."""
TOKEN_PREFIX = "dfn_"
"""Node tokens start with this, so a leaked one is recognisable (and secret scanners can)."""
STATUS_LIMIT = 20
"""How many refused updates and rejected candidates per model the status shows."""


class FederationRepoError(ValueError):
    """An administrative change that cannot be made; the message is for the operator."""


# --- tokens -------------------------------------------------------------------------------


def new_token() -> str:
    """A new node token: ``dfn_`` and 256 random bits (43 URL-safe characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The sha256 (hex) under which a token is stored and looked up.

    Why no salt and no slow hash (bcrypt, argon2): those protect low-entropy secrets such
    as passwords against guessing. A token is 256 random bits, which no precomputed table
    or brute force can cover, so a plain sha256 is as strong; being deterministic, it is
    also the key of a unique index, so authenticating a request is one indexed lookup
    instead of trying every node's salt. The plain token is never stored.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --- nodes --------------------------------------------------------------------------------


def get_node(session: Session, name: str) -> FedNode | None:
    """The node called ``name`` (revoked or not), or None."""
    return session.scalars(select(FedNode).where(FedNode.name == name)).one_or_none()


def _node(session: Session, name: str) -> FedNode:
    node = get_node(session, name)
    if node is None:
        raise FederationRepoError(f"no node named {name!r}")
    return node


def _model(session: Session, name: str) -> FedModel:
    model = session.get(FedModel, name)
    if model is None:
        raise FederationRepoError(
            f"no federation model named {name!r} (see `dafne-federation model init`)"
        )
    return model


def add_node(
    session: Session,
    name: str,
    models: Sequence[str],
    *,
    can_pull: bool = True,
    can_push: bool = True,
) -> tuple[FedNode, str]:
    """Register a node with rights on ``models``; return it and its plain token.

    The token is returned this once (only its hash is stored): the caller shows it to the
    operator, who gives it to the node.

    Raises
    ------
    FederationRepoError
        If the name is not a valid node name or is taken (revoked nodes included), or a
        model is unknown.
    """
    if not NODE_NAME.fullmatch(name):
        raise FederationRepoError(
            f"invalid node name {name!r}: 1-64 of letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )
    existing = session.scalars(select(FedNode).where(FedNode.name == name)).one_or_none()
    if existing is not None:
        state = "a revoked node" if existing.revoked_at is not None else "a node"
        raise FederationRepoError(f"there is already {state} named {name!r}")
    wanted = list(dict.fromkeys(models))
    for model_name in wanted:
        _model(session, model_name)
    token = new_token()
    node = FedNode(
        name=name, token_sha256=hash_token(token), created_at=utcnow(),
        rights=[FedNodeModel(model_name=model_name, can_pull=can_pull, can_push=can_push)
                for model_name in wanted],
    )
    session.add(node)
    session.flush()
    return node, token


def set_rights(
    session: Session, node_name: str, model: str, *, can_pull: bool, can_push: bool
) -> FedNodeModel:
    """Give a node rights on a model (or change them; both False keeps the row, no rights).

    Raises
    ------
    FederationRepoError
        For an unknown or revoked node, or an unknown model.
    """
    node = _node(session, node_name)
    if node.revoked_at is not None:
        raise FederationRepoError(f"node {node_name!r} is revoked")
    _model(session, model)
    rights = session.get(FedNodeModel, (node.id, model))
    if rights is None:
        rights = FedNodeModel(model_name=model)
        node.rights.append(rights)
    rights.can_pull = can_pull
    rights.can_push = can_push
    session.flush()
    return rights


def revoke_node(session: Session, name: str) -> FedNode:
    """Refuse the node's token from now on; revoking twice keeps the first time.

    The row stays: the node's updates and audit lines still name it.

    Raises
    ------
    FederationRepoError
        For an unknown node.
    """
    node = _node(session, name)
    if node.revoked_at is None:
        node.revoked_at = utcnow()
        session.flush()
    return node


def list_nodes(session: Session) -> list[FedNode]:
    """Every node, revoked ones included, by name."""
    return list(session.scalars(
        select(FedNode).options(selectinload(FedNode.rights)).order_by(FedNode.name)
    ))


def node_for_token(session: Session, token: str) -> FedNode | None:
    """The node a bearer token belongs to; None for an unknown or revoked token.

    The lookup is by the token's sha256, so timing reveals nothing an attacker can use to
    approach a valid token (they do not control the hash they are searching for).
    """
    return session.scalars(
        select(FedNode).where(FedNode.token_sha256 == hash_token(token),
                              FedNode.revoked_at.is_(None))
    ).one_or_none()


def touch_node(session: Session, node: FedNode, now: datetime) -> None:
    """Record that ``node`` was seen at ``now`` (never moving the time backwards)."""
    if node.last_seen_at is None or node.last_seen_at < now:
        node.last_seen_at = now


def node_rights(session: Session, node_id: int, model_name: str) -> FedNodeModel | None:
    """What node ``node_id`` may do with ``model_name``; None: nothing."""
    return session.get(FedNodeModel, (node_id, model_name))


# --- models -------------------------------------------------------------------------------


def add_model(session: Session, name: str, manifest: dict[str, Any], strategy: str) -> FedModel:
    """Register a federation model with its seed manifest and aggregation strategy.

    Raises
    ------
    FederationRepoError
        If the name is not a valid slug or is taken, or the strategy is empty.
    """
    if not MODEL_NAME.fullmatch(name):
        raise FederationRepoError(
            f"invalid model name {name!r}: 1-64 of lower-case letters, digits, '_', '-', "
            "starting with a letter or digit"
        )
    if not strategy:
        raise FederationRepoError("a model needs an aggregation strategy")
    if session.get(FedModel, name) is not None:
        raise FederationRepoError(f"there is already a federation model named {name!r}")
    model = FedModel(name=name, manifest=manifest, strategy=strategy, created_at=utcnow())
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, name: str) -> FedModel | None:
    """The federation model named ``name``, or None."""
    return session.get(FedModel, name)


def list_models(session: Session) -> list[FedModel]:
    """Every federation model, by name."""
    return list(session.scalars(select(FedModel).order_by(FedModel.name)))


# --- generations --------------------------------------------------------------------------


def add_generation(
    session: Session,
    *,
    model_name: str,
    state: GenerationState,
    number: int | None,
    parent_number: int | None,
    strategy: str,
    weights_key: str,
    sha256: str,
    size_bytes: int,
    manifest_key: str | None = None,
    signature: str | None = None,
    validation: dict[str, Any] | None = None,
    reason: str | None = None,
) -> FedGeneration:
    """Record a generation: the seed (promoted, number 1) or a candidate (no number).

    A promoted or rejected generation is recorded as decided now.

    Raises
    ------
    FederationRepoError
        For an unknown model, or a number that does not fit the state (a promoted
        generation has one, candidates and rejected ones have none).
    """
    state = GenerationState(state)
    _model(session, model_name)
    if (state == GenerationState.PROMOTED) != (number is not None):
        raise FederationRepoError(
            f"a {state.value} generation {'needs' if number is None else 'has no'} number"
        )
    now = utcnow()
    generation = FedGeneration(
        model_name=model_name, number=number, state=state, parent_number=parent_number,
        strategy=strategy, weights_key=weights_key, sha256=sha256, size_bytes=size_bytes,
        manifest_key=manifest_key, signature=signature, validation=validation, reason=reason,
        created_at=now, decided_at=None if state == GenerationState.CANDIDATE else now,
    )
    session.add(generation)
    session.flush()
    return generation


def _decide_updates(session: Session, generation: FedGeneration, state: UpdateState,
                    reason: str | None, now: datetime) -> int:
    values: dict[str, Any] = {"state": state, "decided_at": now}
    if reason is not None:
        values["reason"] = reason
    result = session.execute(
        update(FedUpdate)
        .where(FedUpdate.generation_id == generation.id,
               FedUpdate.state == UpdateState.PENDING)
        .values(**values)
        .execution_options(synchronize_session="fetch")
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _check_candidate(generation: FedGeneration) -> None:
    if generation.state != GenerationState.CANDIDATE:
        raise FederationRepoError(
            f"generation {generation.id} of {generation.model_name!r} is "
            f"{generation.state.value}, not a candidate"
        )


def promote(
    session: Session,
    generation: FedGeneration,
    *,
    number: int,
    manifest_key: str,
    signature: str,
    validation: dict[str, Any] | None,
    reason: str | None = None,
) -> int:
    """Promote a candidate to generation ``number``; its updates become applied.

    ``validation`` is None only for the seed (scored at the first aggregation); ``reason``
    notes why it passed (or where a seed came from).

    Returns
    -------
    int
        How many updates were marked applied.

    Raises
    ------
    FederationRepoError
        If ``generation`` is not a candidate, or ``number`` is not the one after the
        latest promoted generation (numbers have no gaps and never go back).
    """
    _check_candidate(generation)
    latest = latest_generation(session, generation.model_name)
    expected = 1 if latest is None or latest.number is None else latest.number + 1
    if number != expected:
        raise FederationRepoError(
            f"the next generation of {generation.model_name!r} is {expected}, not {number}"
        )
    now = utcnow()
    generation.state = GenerationState.PROMOTED
    generation.number = number
    generation.manifest_key = manifest_key
    generation.signature = signature
    generation.validation = validation
    generation.reason = reason
    generation.decided_at = now
    session.flush()
    return _decide_updates(session, generation, UpdateState.APPLIED, None, now)


def reject(
    session: Session, generation: FedGeneration, *, validation: dict[str, Any] | None,
    reason: str,
) -> int:
    """Reject a candidate with ``reason``; its updates become rejected, saying why.

    Returns
    -------
    int
        How many updates were marked rejected.

    Raises
    ------
    FederationRepoError
        If ``generation`` is not a candidate.
    """
    _check_candidate(generation)
    now = utcnow()
    generation.state = GenerationState.REJECTED
    generation.validation = validation
    generation.reason = reason
    generation.decided_at = now
    session.flush()
    return _decide_updates(session, generation, UpdateState.REJECTED,
                           f"candidate {generation.id} was rejected: {reason}", now)


def latest_generation(session: Session, model_name: str) -> FedGeneration | None:
    """The promoted generation with the highest number (candidates and rejected ignored)."""
    return session.scalars(
        select(FedGeneration)
        .where(FedGeneration.model_name == model_name,
               FedGeneration.state == GenerationState.PROMOTED)
        .order_by(FedGeneration.number.desc())
        .limit(1)
    ).first()


def get_generation(session: Session, model_name: str, number: int) -> FedGeneration | None:
    """Promoted generation ``number`` of ``model_name``, or None."""
    return session.scalars(
        select(FedGeneration)
        .where(FedGeneration.model_name == model_name, FedGeneration.number == number,
               FedGeneration.state == GenerationState.PROMOTED)
    ).one_or_none()


def list_generations(
    session: Session, model_name: str
) -> list[tuple[FedGeneration, list[str]]]:
    """Every generation of the model, oldest first, with the ids of its updates (by id)."""
    generations = list(session.scalars(
        select(FedGeneration).where(FedGeneration.model_name == model_name)
        .order_by(FedGeneration.id)
    ))
    members: dict[int, list[str]] = {generation.id: [] for generation in generations}
    if members:
        for generation_id, update_id in session.execute(
            select(FedUpdate.generation_id, FedUpdate.id)
            .where(FedUpdate.generation_id.in_(list(members)))
            .order_by(FedUpdate.id)
        ):
            members[generation_id].append(update_id)
    return [(generation, members[generation.id]) for generation in generations]


# --- updates ------------------------------------------------------------------------------


def insert_update_once(
    session: Session,
    *,
    node_id: int,
    model_name: str,
    idempotency_key: str,
    state: UpdateState,
    base_generation: int | None,
    num_samples: int,
    metrics: dict[str, Any],
    encoding: str,
    size_bytes: int,
    l2_norm: float | None,
    clipped: bool,
    artifact_key: str | None,
    reason: str | None,
    response_status: int,
    response: dict[str, Any],
    update_id: str | None = None,
    continues_key: str | None = None,
) -> tuple[FedUpdate, bool]:
    """Record an upload unless this node already sent ``idempotency_key``.

    One ``INSERT … ON CONFLICT DO NOTHING``: of two requests racing with the same key,
    one inserts and the other (on PostgreSQL, after waiting for the first to commit)
    inserts nothing and gets the first row.

    ``state`` is ``pending`` (accepted) or ``refused`` (decided at once). ``update_id``
    (32 hex characters, a new uuid4 if not given) lets the caller name the update's
    artifact before recording it. ``continues_key`` is the node's earlier upload this one
    contains, if it says so. The other fields are the columns of
    :class:`db.fed_models.FedUpdate`.

    Returns
    -------
    tuple of FedUpdate and bool
        The row for ``(node_id, idempotency_key)`` and whether this call created it.

    Raises
    ------
    FederationRepoError
        For another state than pending or refused.
    """
    state = UpdateState(state)
    if state not in (UpdateState.PENDING, UpdateState.REFUSED):
        raise FederationRepoError(f"a new update is pending or refused, not {state.value}")
    now = utcnow()
    values = {
        "id": update_id or uuid.uuid4().hex,
        "node_id": node_id,
        "model_name": model_name,
        "idempotency_key": idempotency_key,
        "state": state.value,
        "base_generation": base_generation,
        "continues_key": continues_key,
        "num_samples": num_samples,
        "metrics": metrics,
        "encoding": encoding,
        "size_bytes": size_bytes,
        "l2_norm": l2_norm,
        "clipped": clipped,
        "artifact_key": artifact_key,
        "generation_id": None,
        "reason": reason,
        "response_status": response_status,
        "response": response,
        "received_at": now,
        "decided_at": now if state == UpdateState.REFUSED else None,
    }
    inserted = session.scalar(
        dialect_insert(session, FedUpdate).values(values)
        .on_conflict_do_nothing(index_elements=["node_id", "idempotency_key"])
        .returning(FedUpdate.id)
    )
    if inserted is not None:
        return session.get_one(FedUpdate, inserted), True
    return session.scalars(
        select(FedUpdate)
        .where(FedUpdate.node_id == node_id, FedUpdate.idempotency_key == idempotency_key)
    ).one(), False


def find_update(session: Session, node_id: int, key: str) -> FedUpdate | None:
    """The update node ``node_id`` sent with idempotency key ``key``, or None."""
    return session.scalars(
        select(FedUpdate)
        .where(FedUpdate.node_id == node_id, FedUpdate.idempotency_key == key)
    ).one_or_none()


def get_update(session: Session, update_id: str) -> FedUpdate | None:
    """The update with id ``update_id``, or None."""
    return session.get(FedUpdate, update_id)


def _waiting_any_model() -> tuple[ColumnElement[bool], ...]:
    """Pending updates not yet in a candidate."""
    return FedUpdate.state == UpdateState.PENDING, FedUpdate.generation_id.is_(None)


def _waiting(model_name: str) -> tuple[ColumnElement[bool], ...]:
    """Pending updates of ``model_name`` not yet in a candidate (the aggregation buffer)."""
    return FedUpdate.model_name == model_name, *_waiting_any_model()


def pending_updates(session: Session, model_name: str, limit: int) -> list[FedUpdate]:
    """Up to ``limit`` updates waiting for aggregation, oldest first."""
    return list(session.scalars(
        select(FedUpdate).where(*_waiting(model_name))
        .order_by(FedUpdate.received_at, FedUpdate.id).limit(limit)
    ))


def pending_summary(session: Session, model_name: str) -> tuple[int, datetime | None]:
    """How many updates wait for aggregation, and when the oldest arrived."""
    count, oldest = session.execute(
        select(func.count(), func.min(FedUpdate.received_at)).where(*_waiting(model_name))
    ).one()
    return int(count), oldest


def assign_updates(
    session: Session, update_ids: Sequence[str], generation: FedGeneration
) -> int:
    """Put updates into candidate ``generation``; return how many were assigned.

    Only updates of the candidate's model that are still pending and in no candidate are
    assigned, in one ``UPDATE``, so an update is never aggregated twice even if two
    aggregators picked it (the second assigns 0 and must not use it).

    Raises
    ------
    FederationRepoError
        If ``generation`` is not a candidate.
    """
    _check_candidate(generation)
    if not update_ids:
        return 0
    result = session.execute(
        update(FedUpdate)
        .where(FedUpdate.id.in_(list(update_ids)), *_waiting(generation.model_name))
        .values(generation_id=generation.id)
        .execution_options(synchronize_session="fetch")
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def refuse_update(session: Session, update_id: str, reason: str) -> bool:
    """Refuse a waiting update after all (its stored upload is unreadable at aggregation).

    Only an update that is pending and in no candidate changes; return whether it did.
    The first answer the node got (``response``) is kept; the node sees the new state
    and reason when it asks for the update.
    """
    return _decide_waiting(session, update_id, UpdateState.REFUSED, reason)


def _decide_waiting(session: Session, update_id: str, state: UpdateState, reason: str) -> bool:
    """Give a waiting update its final ``state`` without aggregating it.

    One conditional ``UPDATE``: an update that a candidate took meanwhile is left alone.
    """
    result = session.execute(
        update(FedUpdate)
        .where(FedUpdate.id == update_id, *_waiting_any_model())
        .values(state=state, reason=reason, decided_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def node_updates(session: Session, model_name: str, node_ids: Collection[int],
                 base_generations: Collection[int]) -> list[FedUpdate]:
    """Every update of ``node_ids`` to ``model_name`` against one of ``base_generations``.

    What :func:`federation.lineage.resolve_lineage` needs to follow the ``continues``
    chains of a buffer of waiting updates (a chain never leaves its node and base).
    """
    if not node_ids or not base_generations:
        return []
    return list(session.scalars(
        select(FedUpdate)
        .where(FedUpdate.model_name == model_name, FedUpdate.node_id.in_(list(node_ids)),
               FedUpdate.base_generation.in_(list(base_generations)))
        .order_by(FedUpdate.received_at, FedUpdate.id)
    ))


def supersede_update(session: Session, update_id: str, reason: str) -> bool:
    """Mark a waiting update superseded by a later one of its node that contains it.

    Only an update that is pending and in no candidate changes; return whether it did.
    Its stored upload is kept for the record.
    """
    return _decide_waiting(session, update_id, UpdateState.SUPERSEDED, reason)


# --- the aggregation lock -----------------------------------------------------------------


def acquire_lease(
    session: Session, model_name: str, owner: str, seconds: float, now: datetime
) -> bool:
    """Take (or renew) the aggregation lock of ``model_name`` for ``seconds``.

    One conditional ``UPDATE``: it succeeds if nobody holds the lease, the holder's lease
    ran out (a crashed aggregator), or ``owner`` already holds it (a renewal). Commit at
    once so other aggregators see it.

    Returns
    -------
    bool
        Whether ``owner`` holds the lease now; False also for an unknown model.
    """
    result = session.execute(
        update(FedModel)
        .where(FedModel.name == model_name,
               or_(FedModel.lease_until.is_(None), FedModel.lease_until < now,
                   FedModel.lease_owner == owner))
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=seconds))
        .execution_options(synchronize_session="fetch")
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release_lease(session: Session, model_name: str, owner: str) -> bool:
    """Give the lock back if ``owner`` holds it; return whether it did."""
    result = session.execute(
        update(FedModel)
        .where(FedModel.name == model_name, FedModel.lease_owner == owner)
        .values(lease_owner=None, lease_until=None)
        .execution_options(synchronize_session="fetch")
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# --- audit --------------------------------------------------------------------------------


def audit(
    session: Session,
    *,
    actor: str | None,
    method: str,
    path: str,
    status: int,
    reason: str | None = None,
    client: str | None = None,
) -> FedAudit:
    """Record one request.

    Over-long values are cut to their column: an audit line must never be what makes a
    request fail.
    """
    row = FedAudit(at=utcnow(), actor=None if actor is None else actor[:64],
                   method=method[:16], path=path, status=status, reason=reason,
                   client=None if client is None else client[:64])
    session.add(row)
    session.flush()
    return row


def recent_audit(session: Session, limit: int = 100) -> list[FedAudit]:
    """The newest ``limit`` audit lines, newest first."""
    return list(session.scalars(select(FedAudit).order_by(FedAudit.id.desc()).limit(limit)))


# --- status -------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _model_status(session: Session, model: FedModel) -> dict[str, Any]:
    latest = latest_generation(session, model.name)
    rejected = session.scalars(
        select(FedGeneration)
        .where(FedGeneration.model_name == model.name,
               FedGeneration.state == GenerationState.REJECTED)
        .order_by(FedGeneration.id.desc()).limit(STATUS_LIMIT)
    )
    refused = session.execute(
        select(FedUpdate, FedNode.name).join(FedNode, FedUpdate.node_id == FedNode.id)
        .where(FedUpdate.model_name == model.name, FedUpdate.state == UpdateState.REFUSED)
        .order_by(FedUpdate.received_at.desc(), FedUpdate.id.desc()).limit(STATUS_LIMIT)
    )
    pending, oldest = pending_summary(session, model.name)
    return {
        "name": model.name,
        "strategy": model.strategy,
        "latest": None if latest is None else {
            "number": latest.number,
            "created_at": _iso(latest.created_at),
            "validation": latest.validation,
        },
        "rejected": [
            {"id": generation.id, "reason": generation.reason,
             "decided_at": _iso(generation.decided_at)}
            for generation in rejected
        ],
        "pending": pending,
        "oldest_pending_at": _iso(oldest),
        "refused": [
            {"id": row.id, "node": node_name, "reason": row.reason,
             "received_at": _iso(row.received_at)}
            for row, node_name in refused
        ],
        "lease_owner": model.lease_owner,
        "lease_until": _iso(model.lease_until),
    }


def federation_status(session: Session) -> dict[str, Any]:
    """What an operator needs to see, as JSON-able data (``GET /v1/admin/status``).

    ``{"models": [{"name", "strategy", "latest": {"number", "created_at", "validation"}
    | None, "pending", "oldest_pending_at", "rejected": [{"id", "reason", "decided_at"}],
    "refused": [{"id", "node", "reason", "received_at"}], "lease_owner", "lease_until"}],
    "nodes": [{"name", "models": {model: {"pull", "push"}}, "created_at", "last_seen_at",
    "revoked", "revoked_at"}]}``; times are ISO 8601 strings. Rejected candidates and
    refused updates are the newest first, at most :data:`STATUS_LIMIT` of each.
    """
    nodes = list_nodes(session)
    return {
        "models": [_model_status(session, model) for model in list_models(session)],
        "nodes": [
            {
                "name": node.name,
                "models": {rights.model_name: {"pull": rights.can_pull,
                                               "push": rights.can_push}
                           for rights in node.rights},
                "created_at": _iso(node.created_at),
                "last_seen_at": _iso(node.last_seen_at),
                "revoked": node.revoked_at is not None,
                "revoked_at": _iso(node.revoked_at),
            }
            for node in nodes
        ],
    }
