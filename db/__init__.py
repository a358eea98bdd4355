"""Database layer: SQLAlchemy 2 models, sessions and Alembic migrations.

The node's schema is created and upgraded by running its Alembic history
(:func:`db.migrate.upgrade`), on SQLite (embedded default) and PostgreSQL alike.
"""

from db.jobs import claim_next_job, enqueue_job, heartbeat, requeue_stale_jobs
from db.migrate import current_revision, head_revision, upgrade
from db.repository import (
    IndexResult,
    SqlInstanceIndex,
    complete_quiet_series,
    count_instances,
    index_instance,
    index_instances,
)
from db.session import make_engine, make_session_factory, session_scope, sqlite_url

__all__ = [
    "IndexResult",
    "SqlInstanceIndex",
    "claim_next_job",
    "complete_quiet_series",
    "count_instances",
    "current_revision",
    "enqueue_job",
    "head_revision",
    "heartbeat",
    "index_instance",
    "index_instances",
    "make_engine",
    "make_session_factory",
    "requeue_stale_jobs",
    "session_scope",
    "sqlite_url",
    "upgrade",
]
