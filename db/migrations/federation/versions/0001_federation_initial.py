"""Federation schema: nodes and rights, models, generations, updates, audit.

``fed_nodes``, ``fed_models``, ``fed_node_models``, ``fed_generations``, ``fed_updates``,
``fed_audit``; the version table is ``alembic_version_federation``.

Revision ID: 0001_federation
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_federation"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = sa.String(64)
_SHA256 = sa.String(64)
_STATE = sa.String(16)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create the federation tables."""
    op.create_table(
        "fed_nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", _NAME, nullable=False),
        sa.Column("token_sha256", _SHA256, nullable=False),
        _time("created_at"),
        _time("revoked_at", nullable=True),
        _time("last_seen_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fed_nodes")),
        sa.UniqueConstraint("name", name=op.f("uq_fed_nodes_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_fed_nodes_token_sha256")),
    )
    op.create_table(
        "fed_models",
        sa.Column("name", _NAME, nullable=False),
        sa.Column("manifest", _JSON, nullable=False),
        sa.Column("strategy", sa.String(64), nullable=False),
        _time("created_at"),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        _time("lease_until", nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_fed_models")),
    )
    op.create_table(
        "fed_node_models",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("model_name", _NAME, nullable=False),
        sa.Column("can_pull", sa.Boolean(), nullable=False),
        sa.Column("can_push", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["fed_nodes.id"],
            name=op.f("fk_fed_node_models_node_id_fed_nodes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_name"],
            ["fed_models.name"],
            name=op.f("fk_fed_node_models_model_name_fed_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("node_id", "model_name", name=op.f("pk_fed_node_models")),
    )
    op.create_table(
        "fed_generations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", _NAME, nullable=False),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("parent_number", sa.Integer(), nullable=True),
        sa.Column("strategy", sa.String(64), nullable=False),
        sa.Column("weights_key", sa.Text(), nullable=False),
        sa.Column("sha256", _SHA256, nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("manifest_key", sa.Text(), nullable=True),
        sa.Column("signature", sa.Text(), nullable=True),
        sa.Column("validation", _JSON, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        _time("created_at"),
        _time("decided_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["model_name"],
            ["fed_models.name"],
            name=op.f("fk_fed_generations_model_name_fed_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fed_generations")),
        sa.UniqueConstraint(
            "model_name", "number", name=op.f("uq_fed_generations_model_name_number")
        ),
    )
    op.create_index(
        "ix_fed_generations_model_state", "fed_generations", ["model_name", "state", "id"]
    )
    op.create_table(
        "fed_updates",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("model_name", _NAME, nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("base_generation", sa.Integer(), nullable=True),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        sa.Column("metrics", _JSON, nullable=False),
        sa.Column("encoding", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("l2_norm", sa.Float(), nullable=True),
        sa.Column("clipped", sa.Boolean(), nullable=False),
        sa.Column("artifact_key", sa.Text(), nullable=True),
        sa.Column("generation_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=False),
        sa.Column("response", _JSON, nullable=False),
        _time("received_at"),
        _time("decided_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["fed_nodes.id"],
            name=op.f("fk_fed_updates_node_id_fed_nodes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["fed_generations.id"],
            name=op.f("fk_fed_updates_generation_id_fed_generations"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fed_updates")),
        sa.UniqueConstraint(
            "node_id", "idempotency_key", name=op.f("uq_fed_updates_node_id_idempotency_key")
        ),
    )
    op.create_index(op.f("ix_fed_updates_generation_id"), "fed_updates", ["generation_id"])
    op.create_index(
        "ix_fed_updates_model_state_received",
        "fed_updates",
        ["model_name", "state", "received_at"],
    )
    op.create_table(
        "fed_audit",
        sa.Column("id", _BIGID, nullable=False),
        _time("at"),
        sa.Column("actor", _NAME, nullable=True),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("client", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fed_audit")),
    )


def downgrade() -> None:
    """Drop the federation tables."""
    op.drop_table("fed_audit")
    op.drop_index("ix_fed_updates_model_state_received", table_name="fed_updates")
    op.drop_index(op.f("ix_fed_updates_generation_id"), table_name="fed_updates")
    op.drop_table("fed_updates")
    op.drop_index("ix_fed_generations_model_state", table_name="fed_generations")
    op.drop_table("fed_generations")
    op.drop_table("fed_node_models")
    op.drop_table("fed_models")
    op.drop_table("fed_nodes")
