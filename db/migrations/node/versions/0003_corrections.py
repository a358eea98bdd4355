"""Corrections and local models.

``corrections``: every SEG a viewer sends back, and what the node made of it.
``models.local_round``: a model fine-tuned on this node's corrections is round 1, 2, … on
top of its root generation (0 for the root itself), so ``(name, generation, local_round)``
is what identifies a model.
``series.files_removed_at``: when retention removed a series' spool files.

Revision ID: 0003_corrections
Revises: 0002_instance_crc32
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_corrections"
down_revision: str | None = "0002_instance_crc32"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UID = sa.String(64)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create ``corrections``; add ``models.local_round``."""
    op.create_table(
        "corrections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", _BIGID, nullable=True),
        sa.Column("seg_sop_instance_uid", _UID, nullable=False),
        sa.Column("seg_series_id", sa.Integer(), nullable=True),
        sa.Column("source_series_id", sa.Integer(), nullable=True),
        sa.Column("source_series_uid", _UID, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("writer", sa.String(128), nullable=True),
        sa.Column("labels", _JSON, nullable=False),
        sa.Column("unmapped", _JSON, nullable=False),
        sa.Column("dice", _JSON, nullable=False),
        sa.Column("changed_slices", _JSON, nullable=False),
        sa.Column("corrects_job_id", _BIGID, nullable=True),
        sa.Column("model_name", sa.String(64), nullable=True),
        sa.Column("model_version", sa.String(32), nullable=True),
        sa.Column("example_path", sa.Text(), nullable=True),
        sa.Column("superseded_by_id", sa.Integer(), nullable=True),
        sa.Column("trained_job_id", _BIGID, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL",
                                name=op.f("fk_corrections_job_id_jobs")),
        sa.ForeignKeyConstraint(["seg_series_id"], ["series.id"], ondelete="SET NULL",
                                name=op.f("fk_corrections_seg_series_id_series")),
        sa.ForeignKeyConstraint(["source_series_id"], ["series.id"], ondelete="SET NULL",
                                name=op.f("fk_corrections_source_series_id_series")),
        sa.ForeignKeyConstraint(["corrects_job_id"], ["jobs.id"], ondelete="SET NULL",
                                name=op.f("fk_corrections_corrects_job_id_jobs")),
        sa.ForeignKeyConstraint(["superseded_by_id"], ["corrections.id"], ondelete="SET NULL",
                                name=op.f("fk_corrections_superseded_by_id_corrections")),
        sa.ForeignKeyConstraint(["trained_job_id"], ["jobs.id"], ondelete="SET NULL",
                                name=op.f("fk_corrections_trained_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corrections")),
        sa.UniqueConstraint("seg_sop_instance_uid",
                            name=op.f("uq_corrections_seg_sop_instance_uid")),
    )
    op.create_index("ix_corrections_state", "corrections", ["state", "id"])
    op.create_index(op.f("ix_corrections_source_series_id"), "corrections",
                    ["source_series_id"])


    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("files_removed_at", sa.DateTime(timezone=True),
                                   nullable=True))
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("local_round", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.drop_constraint("uq_models_name_generation", type_="unique")
        batch.create_unique_constraint("uq_models_name_generation_local_round",
                                       ["name", "generation", "local_round"])


def downgrade() -> None:
    """Drop ``corrections`` and the local models."""
    op.execute("DELETE FROM models WHERE local_round > 0")
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint("uq_models_name_generation_local_round", type_="unique")
        batch.create_unique_constraint("uq_models_name_generation", ["name", "generation"])
        batch.drop_column("local_round")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("files_removed_at")
    op.drop_table("corrections")
