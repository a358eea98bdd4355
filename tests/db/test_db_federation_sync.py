"""The sync client's tables: migration 0004 and the repository, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, delete, inspect, text
from sqlalchemy.exc import IntegrityError

from db.base import utcnow
from db.federation_sync import (
    due_uploads,
    enqueue_upload,
    sync_state,
    take_lease,
    upload_counts,
)
from db.migrate import alembic_config, current_revision, upgrade
from db.node_models import FederationSync, FederationUpload, UploadState
from db.session import make_engine, session_scope
from tests.postgres import PG_URL, temporary_schema

TABLES = {"federation_uploads", "federation_sync"}


@pytest.fixture
def sync_engine(engine: Engine) -> Iterator[Engine]:
    """The migrated ``engine``, with this module's rows removed afterwards."""
    yield engine
    with session_scope(engine) as session:
        session.execute(delete(FederationUpload))
        session.execute(delete(FederationSync))


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_migration_0004_adds_the_tables_and_keeps_the_data(backend: str, tmp_path: Path) -> None:
    def run(engine: Engine) -> None:
        upgrade(engine, "0003_corrections")
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO models (name, generation, local_round, path, sha256, active, "
                "source, created_at) VALUES ('Dafne leg', 1, 0, '/m', :sha, true, 'bundled', "
                ":now)"), {"sha": "0" * 64, "now": utcnow()})
        assert not TABLES & set(inspect(engine).get_table_names())
        assert upgrade(engine, "0004_federation_sync") == "0004_federation_sync"
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as connection:
            assert connection.execute(text("SELECT name, generation FROM models")).one() \
                == ("Dafne leg", 1)
        config = alembic_config()
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0003_corrections")
        assert current_revision(engine) == "0003_corrections"
        assert not TABLES & set(inspect(engine).get_table_names())

    if backend == "sqlite":
        engine = make_engine(tmp_path / "node.db")
        try:
            run(engine)
        finally:
            engine.dispose()
        return
    with temporary_schema("test_sync") as schema:
        engine = make_engine(PG_URL, schema=schema)
        try:
            run(engine)
        finally:
            engine.dispose()


def test_a_delta_is_queued_once_with_a_key_the_server_accepts(
    sync_engine: Engine, tmp_path: Path,
) -> None:
    now = utcnow()
    with session_scope(sync_engine) as session:
        first = enqueue_upload(session, delta_path=tmp_path / "a" / "delta.safetensors",
                               base_generation=1, local_round=1, now=now)
        again = enqueue_upload(session, delta_path=tmp_path / "a" / "delta.safetensors",
                               base_generation=1, local_round=1, now=now)
        second = enqueue_upload(session, delta_path=tmp_path / "b" / "delta.safetensors",
                                base_generation=1, local_round=2, now=now - timedelta(hours=1))
        assert again.id == first.id
        keys = (first.idempotency_key, second.idempotency_key)
    assert keys[0] != keys[1]
    assert all(re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", key) for key in keys)
    with session_scope(sync_engine) as session:
        assert due_uploads(session, now) == [second.id, first.id], "oldest due first"
        assert due_uploads(session, now - timedelta(minutes=30)) == [second.id]
        row = session.get(FederationUpload, first.id)
        assert row is not None
        assert (row.state, row.attempts, row.payload_path, row.delta_path) == (
            UploadState.PENDING, 0, None, str((tmp_path / "a" / "delta.safetensors").resolve()))
        row.state = UploadState.SENT
    with session_scope(sync_engine) as session:
        assert upload_counts(session) == {"pending": 1, "sent": 1, "refused": 0}
        assert due_uploads(session, now) == [second.id]
    with pytest.raises(IntegrityError), session_scope(sync_engine) as session:
        session.add(FederationUpload(delta_path="c", idempotency_key=keys[0],
                                     base_generation=1, local_round=3))


def test_one_process_holds_the_sync_lease_until_it_runs_out(sync_engine: Engine) -> None:
    now = utcnow()
    minute = timedelta(minutes=1)
    with session_scope(sync_engine) as session:
        assert take_lease(session, "leg", "a@host:1", now=now, duration=minute)
        assert not take_lease(session, "leg", "b@host:2", now=now, duration=minute)
        assert take_lease(session, "leg", "a@host:1", now=now + minute / 2, duration=minute)
        assert not take_lease(session, "leg", "b@host:2", now=now + minute, duration=minute)
        assert take_lease(session, "leg", "b@host:2", now=now + 2 * minute, duration=minute)
        assert take_lease(session, "other", "a@host:1", now=now, duration=minute), \
            "one lease per model"
    with session_scope(sync_engine) as session:
        state = sync_state(session, "leg")
        assert (state.lease_owner, state.lease_until) == ("b@host:2", now + 3 * minute)
        assert state.generation_pulled is None and state.last_poll_at is None
