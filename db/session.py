"""Engines and sessions for SQLite (embedded default) and PostgreSQL (production).

SQLite is tuned for a node that receives from several associations while workers claim
jobs: WAL (readers never block the writer), a busy timeout instead of instant "database is
locked" errors, foreign keys on, and every transaction started with ``BEGIN IMMEDIATE`` so a
transaction that reads and then writes cannot fail with ``SQLITE_BUSY_SNAPSHOT`` half way.
Commits are durable by default (``synchronous=FULL``): the node acknowledges a C-STORE only
after its index row is committed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["make_engine", "make_session_factory", "session_scope", "sqlite_url"]

LOGGER = logging.getLogger(__name__)

_SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of an SQLite database file."""
    return f"sqlite:///{Path(path).resolve()}"


def make_engine(
    url: str | Path,
    *,
    schema: str | None = None,
    sqlite_synchronous: str = "FULL",
    busy_timeout_s: float = 30.0,
    pool_size: int = 5,
    echo: bool = False,
) -> Engine:
    """Create an engine for ``url`` (a URL string, or the path of an SQLite file).

    Parameters
    ----------
    url : str or pathlib.Path
        ``sqlite:///…`` or ``postgresql+psycopg://…``; a path means an SQLite file.
    schema : str, optional
        PostgreSQL only: the schema to put first on the ``search_path`` (tables are
        created and found there), for sharing one database between deployments or tests.
    sqlite_synchronous : str
        SQLite ``PRAGMA synchronous`` (``FULL``: each commit is fsynced; ``NORMAL``: a
        power cut may lose the last commits, never corrupts).
    busy_timeout_s : float
        SQLite: how long to wait for another connection's write lock.
    pool_size : int
        Connections kept open (PostgreSQL and SQLite files).
    echo : bool
        Log all SQL.

    Raises
    ------
    ValueError
        For an unknown ``sqlite_synchronous`` value, or ``schema`` on SQLite.
    """
    if isinstance(url, Path):
        url = sqlite_url(url)
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if backend == "sqlite":
        if schema is not None:
            raise ValueError("schema is only supported on PostgreSQL")
        synchronous = sqlite_synchronous.upper()
        if synchronous not in _SQLITE_SYNCHRONOUS:
            raise ValueError(f"sqlite_synchronous must be one of {_SQLITE_SYNCHRONOUS}")
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs.update(pool_size=pool_size, max_overflow=10)
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine, synchronous, busy_timeout_s)
        return engine

    if backend == "postgresql":
        kwargs.update(pool_size=pool_size, max_overflow=10, pool_pre_ping=True)
        if schema is not None:
            kwargs["connect_args"] = {"options": f"-csearch_path={schema},public"}
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine, synchronous: str, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # let SQLAlchemy's "begin" event start transactions (pysqlite would BEGIN DEFERRED)
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA temp_store = MEMORY")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay usable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session] | Engine) -> Iterator[Session]:
    """A session in a transaction: committed if the block succeeds, rolled back if not.

    Parameters
    ----------
    factory : sessionmaker or Engine
        Where sessions come from (an engine gets a default factory).
    """
    if isinstance(factory, Engine):
        factory = make_session_factory(factory)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
