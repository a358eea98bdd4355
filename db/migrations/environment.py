"""What both Alembic environments (node and federation) do, parameterised by schema.

Each history's ``env.py`` calls :func:`run_environment` with its metadata, version table and
advisory-lock key. Run programmatically through :func:`db.migrate.upgrade` (which passes an
open connection in ``config.attributes["connection"]``) or with the ``alembic`` command and
an ``-x url=…`` or ``sqlalchemy.url`` option.

Why the details:

* Each schema has its own version table, and autogenerate looks only at that schema's own
  tables, so the node and federation histories can share one database without either
  proposing to drop the other's tables.
* On PostgreSQL every migration runs under ``pg_advisory_xact_lock``: processes that start
  together (two node workers, two federation API replicas) migrate one after the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alembic import context
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection

from db.session import make_engine

__all__ = ["run_environment"]


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    return url or context.config.get_main_option("sqlalchemy.url") or ""


def run_environment(metadata: MetaData, *, version_table: str, pg_lock_key: int) -> None:
    """Run the migrations of the schema described by ``metadata`` (online or offline)."""

    def include_name(name: str | None, type_: str, _parents: Mapping[str, Any]) -> bool:
        return type_ != "table" or name in metadata.tables

    options: dict[str, Any] = {"target_metadata": metadata, "version_table": version_table,
                               "include_name": include_name}

    def configure(connection: Connection) -> None:
        context.configure(connection=connection, render_as_batch=connection.dialect.name
                          == "sqlite", compare_type=True, **options)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({pg_lock_key})")
            context.run_migrations()

    if context.is_offline_mode():  # emit SQL instead of running it (alembic upgrade --sql)
        context.configure(url=_url(), literal_binds=True, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = context.config.attributes.get("connection")
    if connection is not None:
        configure(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as new_connection:
            configure(new_connection)
            new_connection.commit()
    finally:
        engine.dispose()
