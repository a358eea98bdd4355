"""Node schema: studies, series, instances, jobs, outbox, models, node_state.

Revision ID: 0001_node
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_node"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UID = sa.String(64)
_AE = sa.String(16)
_STATE = sa.String(16)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create the node tables."""
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", _UID, nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=True),
        sa.Column("study_date", sa.String(16), nullable=True),
        sa.Column("accession_number", sa.String(64), nullable=True),
        sa.Column("study_description", sa.Text(), nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_studies_study_instance_uid")),
    )
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", _UID, nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("body_part_examined", sa.String(64), nullable=True),
        sa.Column("series_description", sa.Text(), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("image_type", sa.String(128), nullable=True),
        sa.Column("sop_class_uid", _UID, nullable=True),
        sa.Column("calling_ae", _AE, nullable=True),
        sa.Column("peer_address", sa.String(64), nullable=True),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("num_frames", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        _time("first_received_at"),
        _time("last_received_at"),
        _time("completed_at", nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_series_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_series_series_instance_uid")),
    )
    op.create_index(op.f("ix_series_study_id"), "series", ["study_id"])
    op.create_index("ix_series_state_last_received_at", "series", ["state", "last_received_at"])

    op.create_table(
        "instances",
        sa.Column("id", _BIGID, nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", _UID, nullable=False),
        sa.Column("sop_class_uid", _UID, nullable=False),
        sa.Column("transfer_syntax_uid", _UID, nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("image_type", sa.String(128), nullable=True),
        sa.Column("spool_path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        _time("received_at"),
        sa.Column("calling_ae", _AE, nullable=True),
        sa.Column("called_ae", _AE, nullable=True),
        sa.Column("peer_address", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_instances_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    op.create_index(op.f("ix_instances_series_id"), "instances", ["series_id"])

    op.create_table(
        "jobs",
        sa.Column("id", _BIGID, nullable=False),
        sa.Column("kind", _STATE, nullable=False),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=True),
        sa.Column("series_revision", sa.Integer(), nullable=True),
        sa.Column("model_name", sa.String(64), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _time("not_before", nullable=True),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        _time("claimed_at", nullable=True),
        _time("heartbeat_at", nullable=True),
        _time("finished_at", nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("payload", _JSON, nullable=False),
        sa.Column("result", _JSON, nullable=True),
        sa.Column("result_sop_instance_uid", _UID, nullable=True),
        sa.Column("supersedes_id", _BIGID, nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_jobs_series_id_series"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["supersedes_id"],
            ["jobs.id"],
            name=op.f("fk_jobs_supersedes_id_jobs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint(
            "kind",
            "series_id",
            "series_revision",
            name=op.f("uq_jobs_kind_series_id_series_revision"),
        ),
    )
    op.create_index(op.f("ix_jobs_series_id"), "jobs", ["series_id"])
    op.create_index("ix_jobs_claim", "jobs", ["state", "kind", "priority", "id"])

    op.create_table(
        "outbox",
        sa.Column("id", _BIGID, nullable=False),
        sa.Column("job_id", _BIGID, nullable=True),
        sa.Column("destination", sa.String(64), nullable=True),
        sa.Column("ae_title", _AE, nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sop_instance_uid", _UID, nullable=False),
        sa.Column("sop_class_uid", _UID, nullable=True),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _time("next_attempt_at"),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        _time("claimed_at", nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        _time("sent_at", nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_outbox_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint(
            "sop_instance_uid",
            "ae_title",
            "host",
            "port",
            name=op.f("uq_outbox_sop_instance_uid_ae_title_host_port"),
        ),
    )
    op.create_index(op.f("ix_outbox_job_id"), "outbox", ["job_id"])
    op.create_index("ix_outbox_due", "outbox", ["state", "next_attempt_at"])

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(32), nullable=True),
        sa.Column("manifest", _JSON, nullable=True),
        _time("created_at"),
        _time("activated_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", "generation", name=op.f("uq_models_name_generation")),
    )
    op.create_index(
        "uq_models_active_name",
        "models",
        ["name"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )

    op.create_table(
        "node_state",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", _JSON, nullable=False),
        _time("updated_at"),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_node_state")),
    )


def downgrade() -> None:
    """Drop the node tables."""
    op.drop_table("node_state")
    op.drop_index("uq_models_active_name", table_name="models")
    op.drop_table("models")
    op.drop_index("ix_outbox_due", table_name="outbox")
    op.drop_index(op.f("ix_outbox_job_id"), table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.drop_index(op.f("ix_jobs_series_id"), table_name="jobs")
    op.drop_table("jobs")
    op.drop_index(op.f("ix_instances_series_id"), table_name="instances")
    op.drop_table("instances")
    op.drop_index("ix_series_state_last_received_at", table_name="series")
    op.drop_index(op.f("ix_series_study_id"), table_name="series")
    op.drop_table("series")
    op.drop_table("studies")
