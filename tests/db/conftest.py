"""Database fixtures: a migrated SQLite file and a migrated PostgreSQL schema.

PostgreSQL tests get their own schema (unique per test session, dropped at the end), so
concurrent test runs on the shared server never see each other's tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from db.migrate import upgrade
from db.session import make_engine
from tests.postgres import PG_URL, temporary_schema


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema for this test session (skips if no server)."""
    with temporary_schema("test_db") as schema:
        yield schema


def _pg_engine(schema: str) -> Engine:
    return make_engine(PG_URL, schema=schema)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(tmp_path / "node.db")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_schema: str) -> Iterator[Engine]:
    """A migrated schema emptied after each test (tables kept, rows deleted)."""
    engine = _pg_engine(pg_schema)
    upgrade(engine)
    yield engine
    with engine.begin() as connection:
        connection.execute(
            text(
                "TRUNCATE corrections, outbox, jobs, instances, series, studies, models, "
                "node_state RESTART IDENTITY CASCADE"
            )
        )
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each test using this runs on SQLite and on PostgreSQL."""
    return request.getfixturevalue(f"{'pg' if request.param == 'postgresql' else 'sqlite'}_engine")
