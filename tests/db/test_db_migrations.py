"""The node schema is created by Alembic and matches the ORM models on both databases."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from db.base import utcnow
from db.migrate import current_revision, head_revision, upgrade
from db.node_models import Model, NodeBase, NodeState
from db.session import make_engine, session_scope


def test_upgrade_to_head_and_again(engine: Engine) -> None:
    assert current_revision(engine) == head_revision()
    assert upgrade(engine) == head_revision()  # a second start changes nothing
    tables = set(inspect(engine).get_table_names())
    assert {"studies", "series", "instances", "jobs", "outbox", "models", "node_state"} <= tables
    assert "alembic_version_node" in tables


def test_migrated_schema_matches_models(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": "alembic_version_node"}
        )
        assert compare_metadata(context, NodeBase.metadata) == []


def test_upgrade_accepts_a_path_or_url(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "node.db"
    assert upgrade(path) == head_revision()
    engine = make_engine(path)
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_times_round_trip_timezone_aware(engine: Engine) -> None:
    now = utcnow()
    with session_scope(engine) as session:
        session.add(NodeState(key="cursor", value={"generation": 3}, updated_at=now))
    with session_scope(engine) as session:
        row = session.get(NodeState, "cursor")
        assert row is not None
        assert row.value == {"generation": 3}
        assert row.updated_at.tzinfo is not None
        assert abs(row.updated_at - now) < timedelta(milliseconds=1)


def test_one_active_generation_per_model(engine: Engine) -> None:
    with session_scope(engine) as session:
        session.add(Model(name="leg", generation=1, path="a", sha256="0" * 64, active=True))
        session.add(Model(name="leg", generation=2, path="b", sha256="1" * 64, active=False))
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"), session_scope(engine) as session:
        session.add(Model(name="leg", generation=3, path="c", sha256="2" * 64, active=True))


def test_sqlite_pragmas(sqlite_engine: Engine) -> None:
    with sqlite_engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        connection.execute(text("SELECT 1"))


def test_instances_received_before_the_crc32_column_survive_the_upgrade(tmp_path: Path) -> None:
    engine = make_engine(tmp_path / "old.db")
    try:
        assert upgrade(engine, "0001_node") == "0001_node"
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO studies (id, study_instance_uid, created_at, updated_at) "
                "VALUES (1, '1.2', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"))
            connection.execute(text(
                "INSERT INTO series (id, study_id, series_instance_uid, state, revision, "
                "num_instances, num_frames, size_bytes, first_received_at, last_received_at, "
                "created_at, updated_at) VALUES (1, 1, '1.2.3', 'receiving', 0, 1, 1, 10, "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:00', "
                "'2026-01-01 00:00:00')"))
            connection.execute(text(
                "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, "
                "transfer_syntax_uid, spool_path, size_bytes, received_at) VALUES "
                "(1, '1.2.3.4', '1.2.840.10008.5.1.4.1.1.4', '1.2.840.10008.1.2.1', "
                "'1.2/1.2.3/1.2.3.4.dcm', 10, '2026-01-01 00:00:00')"))
        assert upgrade(engine) == head_revision()
        with engine.connect() as connection:
            row = connection.execute(text(
                "SELECT sop_instance_uid, size_bytes, content_crc32 FROM instances")).one()
        assert tuple(row) == ("1.2.3.4", 10, None)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_check_current_names_both_revisions_and_changes_nothing(
    backend: str, tmp_path: Path
) -> None:
    from db.migrate import SchemaMismatchError, check_current  # noqa: PLC0415
    from tests.postgres import PG_URL, temporary_schema  # noqa: PLC0415

    def run(engine: Engine) -> None:
        with pytest.raises(SchemaMismatchError, match="no node database"):
            check_current(engine)
        upgrade(engine, "0001_node")
        with pytest.raises(SchemaMismatchError, match="at schema revision 0001_node"):
            check_current(engine)
        assert current_revision(engine) == "0001_node"
        upgrade(engine)
        check_current(engine)

    if backend == "sqlite":
        engine = make_engine(tmp_path / "node.db")
        try:
            run(engine)
        finally:
            engine.dispose()
        return
    with temporary_schema("test_check") as schema:
        engine = make_engine(PG_URL, schema=schema)
        try:
            run(engine)
        finally:
            engine.dispose()
