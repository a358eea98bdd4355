"""Alembic environment of the federation schema (version table ``alembic_version_federation``)."""

from __future__ import annotations

from db.fed_models import FederationBase
from db.migrations.environment import run_environment

run_environment(FederationBase.metadata, version_table="alembic_version_federation",
                pg_lock_key=0x44414646_46454452)  # "DAFFFEDR"
