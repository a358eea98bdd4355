"""The federation sync client's tables.

``federation_uploads``: one row per weight delta of an accepted training run, sent to the
federation server with retries under a fixed idempotency key (pending -> sent | refused).
``federation_sync``: the client's state per federation model: last poll, last success,
last error, the ETag and number of the newest generation pulled, a refused generation and
why, and the lease that keeps one process syncing at a time.

Revision ID: 0004_federation_sync
Revises: 0003_corrections
Create Date: 2026-12-11
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_federation_sync"
down_revision: str | None = "0003_corrections"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``federation_uploads`` and ``federation_sync``."""
    op.create_table(
        "federation_uploads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("delta_path", sa.Text(), nullable=False),
        sa.Column("payload_path", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("base_generation", sa.Integer(), nullable=False),
        sa.Column("local_round", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TIME, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("server_update_id", sa.String(64), nullable=True),
        sa.Column("server_state", sa.String(16), nullable=True),
        sa.Column("sent_at", _TIME, nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federation_uploads")),
        sa.UniqueConstraint("idempotency_key",
                            name=op.f("uq_federation_uploads_idempotency_key")),
    )
    op.create_index("ix_federation_uploads_due", "federation_uploads",
                    ["state", "next_attempt_at"])
    op.create_table(
        "federation_sync",
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("last_poll_at", _TIME, nullable=True),
        sa.Column("last_success_at", _TIME, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("etag", sa.String(256), nullable=True),
        sa.Column("generation_pulled", sa.Integer(), nullable=True),
        sa.Column("refused_generation", sa.Integer(), nullable=True),
        sa.Column("refused_reason", sa.Text(), nullable=True),
        sa.Column("refused_at", _TIME, nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_until", _TIME, nullable=True),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_federation_sync")),
    )


def downgrade() -> None:
    """Drop both tables (pending uploads are forgotten; their delta files stay)."""
    op.drop_table("federation_sync")
    op.drop_index("ix_federation_uploads_due", table_name="federation_uploads")
    op.drop_table("federation_uploads")
