"""Alembic environment of the federation schema.

Run programmatically through :func:`db.migrate.upgrade` (which passes an open connection in
``config.attributes["connection"]``) or with the ``alembic`` command and an ``-x url=…``
or ``sqlalchemy.url`` option. The version table is ``alembic_version_federation`` and
autogenerate looks only at the federation's own tables, so that the node and federation
histories can share one database without either proposing to drop the other's tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from db.fed_models import FederationBase
from db.session import make_engine

VERSION_TABLE = "alembic_version_federation"
# pg_advisory_xact_lock key: serialises server replicas that start (and migrate) together
_PG_LOCK_KEY = 0x44414646_46454452  # "DAFFFEDR"

config = context.config
target_metadata = FederationBase.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    return url or config.get_main_option("sqlalchemy.url") or ""


def include_name(name: str | None, type_: str, _parents: Mapping[str, Any]) -> bool:
    """Autogenerate compares only this schema's tables (the node's may share the database)."""
    return type_ != "table" or name in target_metadata.tables


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL instead of running it (``alembic upgrade --sql``)."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against the connection given by the caller, or one made from the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as new_connection:
            _configure(new_connection)
            new_connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
