"""Instances record the CRC-32 of their spooled file.

The receiver flushes a file and commits its index row at the same time; after a crash the
CRC-32 tells a completely written file (acknowledged, to be kept) from a partial one.

Revision ID: 0002_instance_crc32
Revises: 0001_node
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_instance_crc32"
down_revision: str | None = "0001_node"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``instances.content_crc32`` (empty for instances received before)."""
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("content_crc32", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Drop ``instances.content_crc32``."""
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("content_crc32")
