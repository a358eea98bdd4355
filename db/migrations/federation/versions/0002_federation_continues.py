"""Updates record which earlier update of their node they contain.

A node that trains on from its own local model uploads cumulative deltas against the same
generation; ``fed_updates.continues_key`` (the earlier upload's idempotency key) lets the
worker supersede the earlier one or aggregate only the difference (``federation.lineage``).
The new ``superseded`` state is a string like the others and needs no change.

Revision ID: 0002_federation_continues
Revises: 0001_federation
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_federation_continues"
down_revision: str | None = "0001_federation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``fed_updates.continues_key`` (null for every update received before)."""
    with op.batch_alter_table("fed_updates") as batch:
        batch.add_column(sa.Column("continues_key", sa.String(128), nullable=True))


def downgrade() -> None:
    """Drop ``fed_updates.continues_key``."""
    with op.batch_alter_table("fed_updates") as batch:
        batch.drop_column("continues_key")
