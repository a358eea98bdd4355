"""The federation server's schema: nodes and their rights, models, generations, updates.

The loop of the server maps onto these tables::

    node (token) -> fed_updates (intake: pending | refused with a reason)
    aggregator (holds fed_models' lease) -> fed_generations (candidate)
        -> gate -> promoted (gets the next number; its updates become applied)
                 | rejected (no number; its updates become rejected, kept for audit)
    every request -> fed_audit

The schema has its own declarative base and its own Alembic history
(``db/migrations/federation``, version table ``alembic_version_federation``), so it can
share a database with the node's schema without either history touching the other's tables.
States are short strings (no database enum or CHECK) as in :mod:`db.node_models`; every time
column is a timezone-aware UTC datetime (:class:`db.base.UTCDateTime`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from db.base import JSONType, UTCDateTime, new_metadata, str_enum, utcnow

__all__ = [
    "FedAudit",
    "FedGeneration",
    "FedModel",
    "FedNode",
    "FedNodeModel",
    "FedUpdate",
    "FederationBase",
    "GenerationState",
    "UpdateState",
]

NAME = String(64)
"""Node and model names (``fed_nodes.name``, ``fed_models.name``)."""
SHA256 = String(64)
"""A sha256 in hex."""


class GenerationState(StrEnum):
    """What became of an aggregated model."""

    CANDIDATE = "candidate"
    """Built by aggregation, waiting for the validation gate."""
    PROMOTED = "promoted"
    """Passed the gate (or is the seed): a numbered, signed root generation nodes pull."""
    REJECTED = "rejected"
    """Failed the gate (see ``reason``); no number, kept for the record."""


class UpdateState(StrEnum):
    """What became of a node's upload."""

    PENDING = "pending"
    """Accepted by intake, waiting in the buffer for aggregation."""
    APPLIED = "applied"
    """Part of a candidate that was promoted."""
    REJECTED = "rejected"
    """Part of a candidate that the gate rejected."""
    REFUSED = "refused"
    """Refused at intake (see ``reason``): never aggregated, no artifact kept."""
    SUPERSEDED = "superseded"
    """Contained in a later update of the same node against the same generation (a
    cumulative delta, see :mod:`federation.lineage`), which is aggregated instead."""


class FederationBase(DeclarativeBase):
    """Declarative base of the federation schema (Alembic history ``db/migrations/federation``)."""

    metadata = new_metadata()
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
    }


class FedNode(FederationBase):
    """A hospital's node allowed to talk to the server, known by the sha256 of its token.

    The plain token is shown once when the node is added and never stored. A revoked node
    keeps its row (its updates and audit lines still name it) but its token is refused.
    """

    __tablename__ = "fed_nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(NAME, unique=True)
    token_sha256: Mapped[str] = mapped_column(SHA256, unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_seen_at: Mapped[datetime | None] = mapped_column()

    rights: Mapped[list[FedNodeModel]] = relationship(
        back_populates="node", order_by="FedNodeModel.model_name"
    )


class FedModel(FederationBase):
    """A federated model: its seed manifest, aggregation strategy and aggregation lock.

    ``lease_owner``/``lease_until`` is the lock that lets one aggregator at a time build
    candidates of this model (``db.federation.acquire_lease``); a lease that is not renewed
    expires, so a crashed aggregator does not block the model for ever.
    """

    __tablename__ = "fed_models"

    name: Mapped[str] = mapped_column(NAME, primary_key=True)
    """The federation's slug (``leg``), not the manifest's display name."""
    manifest: Mapped[dict[str, Any]] = mapped_column()
    """Generation 1's manifest (architecture, labels, preprocessing)."""
    strategy: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column()


class FedNodeModel(FederationBase):
    """What one node may do with one model (no row: nothing)."""

    __tablename__ = "fed_node_models"

    node_id: Mapped[int] = mapped_column(
        ForeignKey("fed_nodes.id", ondelete="CASCADE"), primary_key=True
    )
    model_name: Mapped[str] = mapped_column(
        ForeignKey("fed_models.name", ondelete="CASCADE"), primary_key=True
    )
    can_pull: Mapped[bool] = mapped_column(Boolean, default=True)
    can_push: Mapped[bool] = mapped_column(Boolean, default=True)

    node: Mapped[FedNode] = relationship(back_populates="rights")


class FedGeneration(FederationBase):
    """A model the server built or was seeded with: a candidate, promoted or rejected.

    ``number`` is null until promotion; ``(model_name, number)`` is unique, and since SQL
    unique constraints let nulls repeat, any number of candidates and rejected models can
    exist beside the numbered generations. The artifacts themselves are in the artifact
    store under ``weights_key`` and (once promoted) ``manifest_key``.
    """

    __tablename__ = "fed_generations"
    __table_args__ = (
        UniqueConstraint("model_name", "number"),
        Index("ix_fed_generations_model_state", "model_name", "state", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(ForeignKey("fed_models.name", ondelete="CASCADE"))
    number: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[GenerationState] = mapped_column(str_enum(GenerationState))
    parent_number: Mapped[int | None] = mapped_column(Integer)
    """The promoted generation it was built on; null for the seed."""
    strategy: Mapped[str] = mapped_column(String(64))
    weights_key: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(SHA256)
    """Of the weights (safetensors bytes)."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    manifest_key: Mapped[str | None] = mapped_column(Text)
    signature: Mapped[str | None] = mapped_column(Text)
    """Base64 Ed25519 signature of the manifest's exact bytes (promoted only)."""
    validation: Mapped[dict[str, Any] | None] = mapped_column()
    """``{"mean": float, "sites": {"A": float, …}}`` once scored."""
    reason: Mapped[str | None] = mapped_column(Text)
    """Why it was rejected (or a note on a promotion)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column()

    updates: Mapped[list[FedUpdate]] = relationship(
        back_populates="generation", order_by="FedUpdate.id"
    )
    """The updates aggregated into it."""


class FedUpdate(FederationBase):
    """One upload of one node, accepted (pending) or refused, with the answer it was given.

    ``(node_id, idempotency_key)`` is unique: a node that retries after a lost response
    gets ``response_status``/``response`` again instead of adding a second update.
    ``model_name`` has no foreign key so that a refusal can be recorded as it came.
    """

    __tablename__ = "fed_updates"
    __table_args__ = (
        UniqueConstraint("node_id", "idempotency_key"),
        Index("ix_fed_updates_model_state_received", "model_name", "state", "received_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    """uuid4 in hex."""
    node_id: Mapped[int] = mapped_column(ForeignKey("fed_nodes.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(NAME)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    state: Mapped[UpdateState] = mapped_column(str_enum(UpdateState))
    base_generation: Mapped[int | None] = mapped_column(Integer)
    """The promoted generation number the delta is against; null if unreadable."""
    continues_key: Mapped[str | None] = mapped_column(String(128))
    """Idempotency key of this node's earlier update that this one contains (the node
    trained on from that round's model against the same generation); null for a delta of
    its own."""
    num_samples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    encoding: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    l2_norm: Mapped[float | None] = mapped_column(Float)
    clipped: Mapped[bool] = mapped_column(Boolean, default=False)
    artifact_key: Mapped[str | None] = mapped_column(Text)
    """The stored upload; null when refused (nothing is kept)."""
    generation_id: Mapped[int | None] = mapped_column(
        ForeignKey("fed_generations.id", ondelete="SET NULL"), index=True
    )
    """The candidate it was aggregated into; null while it waits."""
    reason: Mapped[str | None] = mapped_column(Text)
    response_status: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The body of the first answer (replayed for the same idempotency key)."""
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column()

    node: Mapped[FedNode] = relationship()
    generation: Mapped[FedGeneration | None] = relationship(back_populates="updates")


class FedAudit(FederationBase):
    """One request to the API: who, what, the answer, and why if it was refused."""

    __tablename__ = "fed_audit"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str | None] = mapped_column(NAME)
    """A node's name, ``admin``, or null when the token was missing or unknown."""
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    client: Mapped[str | None] = mapped_column(String(64))
    """The client's address."""
