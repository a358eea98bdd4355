"""Alembic environment of the node schema (version table ``alembic_version_node``)."""

from __future__ import annotations

from db.migrations.environment import run_environment
from db.node_models import NodeBase

run_environment(NodeBase.metadata, version_table="alembic_version_node",
                pg_lock_key=0x44414646_4E4F4445)  # "DAFFNODE"
