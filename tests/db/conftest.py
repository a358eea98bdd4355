"""Database fixtures: a migrated SQLite file and a migrated PostgreSQL schema, per history.

PostgreSQL tests get their own schema (unique per test session, dropped at the end), so
concurrent test runs on the shared server never see each other's tables. The node and the
federation schemas each get their own (``engine``, ``fed_engine``), so a test of one history
never finds the other's tables.
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
                "node_state, federation_uploads, federation_sync RESTART IDENTITY CASCADE"
            )
        )
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each test using this runs on SQLite and on PostgreSQL."""
    return request.getfixturevalue(f"{'pg' if request.param == 'postgresql' else 'sqlite'}_engine")


@pytest.fixture(scope="session")
def fed_pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema for the federation tables of this test session."""
    with temporary_schema("test_fed") as schema:
        yield schema


@pytest.fixture
def fed_sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(tmp_path / "federation.db")
    upgrade(engine, history="federation")
    yield engine
    engine.dispose()


@pytest.fixture
def fed_pg_engine(fed_pg_schema: str) -> Iterator[Engine]:
    """The migrated federation schema, emptied after each test."""
    engine = _pg_engine(fed_pg_schema)
    upgrade(engine, history="federation")
    yield engine
    with engine.begin() as connection:
        connection.execute(
            text(
                "TRUNCATE fed_audit, fed_updates, fed_generations, fed_node_models, "
                "fed_models, fed_nodes RESTART IDENTITY CASCADE"
            )
        )
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def fed_engine(request: pytest.FixtureRequest) -> Engine:
    """Each federation test using this runs on SQLite and on PostgreSQL."""
    backend = "pg" if request.param == "postgresql" else "sqlite"
    return request.getfixturevalue(f"fed_{backend}_engine")
