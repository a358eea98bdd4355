"""Shared building blocks for the node's and the federation server's ORM models.

Each schema has its own declarative base (and its own Alembic history), built from the
pieces here so that both use the same constraint names, time type and JSON type.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, Dialect, Enum, MetaData
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator

__all__ = [
    "NAMING_CONVENTION",
    "JSONType",
    "UTCDateTime",
    "dialect_insert",
    "new_metadata",
    "str_enum",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Deterministic constraint names, so migrations can refer to them on every database."""

JSONType = JSON().with_variant(JSONB(), "postgresql")
"""JSON everywhere, JSONB (indexable) on PostgreSQL."""


def new_metadata() -> MetaData:
    """A ``MetaData`` with the project's naming convention."""
    return MetaData(naming_convention=NAMING_CONVENTION)


def str_enum(enum: type[StrEnum]) -> Enum:
    """A column type for a StrEnum: its values as plain strings (no database enum type).

    Why not a native enum: adding a state would then need a migration on PostgreSQL and
    none on SQLite; strings behave the same on both, and SQLAlchemy still validates them.
    """
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    Why: SQLite has no time zone type and returns naive datetimes, PostgreSQL returns
    aware ones; comparing the two raises. Values are stored in UTC (naive on SQLite,
    ``timestamptz`` on PostgreSQL) and always come back aware.

    Raises
    ------
    ValueError
        When binding a naive datetime (its zone would be a guess).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        """Convert to UTC (naive for SQLite)."""
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"UTCDateTime needs a timezone-aware datetime, got {value!r}")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def dialect_insert(session: Session, table: Any) -> Any:
    """An INSERT for ``session``'s database that supports ``on_conflict_do_nothing``.

    Both SQLite and PostgreSQL implement ``INSERT … ON CONFLICT DO NOTHING``, which is what
    makes indexing and job creation idempotent without a read-then-write race.

    Raises
    ------
    NotImplementedError
        For other databases.
    """
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"only SQLite and PostgreSQL are supported, not {name}")
