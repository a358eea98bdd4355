"""Create or upgrade a schema by running its Alembic history (never ``create_all``).

Why Alembic at start rather than ``metadata.create_all``: a node upgraded in place must move
its existing database forward, and the same code path must create a fresh one, so that the
schema a test sees is the schema a hospital's database ends up with.

Usage::

    from db.migrate import upgrade
    upgrade(engine)                       # or a URL, or the path of an SQLite file
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from db.session import make_engine

__all__ = [
    "HISTORIES",
    "SchemaMismatchError",
    "alembic_config",
    "check_current",
    "current_revision",
    "head_revision",
    "upgrade",
]

LOGGER = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"


@dataclass(frozen=True)
class History:
    """One Alembic history: where its scripts are and which version table it uses.

    ``missing`` and ``mismatch`` are what :func:`check_current` tells the operator when the
    database is empty or at another revision (``str.format`` fields ``url``, ``current``,
    ``head``): each schema belongs to another program, with its own commands.
    """

    script_location: Path
    version_table: str
    missing: str
    mismatch: str


HISTORIES: dict[str, History] = {
    "node": History(
        _MIGRATIONS / "node",
        "alembic_version_node",
        missing=(
            "no node database at {url}: start the node (dafne-node serve) once, or point "
            "--data-dir or DAFNE_DB_URL at its data"
        ),
        mismatch=(
            "the node database is at schema revision {current}, this dafne-node expects "
            "{head}: restart the node with this version (dafne-node serve or worker "
            "migrates it), or use the dafne-node of the version that is running"
        ),
    ),
    "federation": History(
        _MIGRATIONS / "federation",
        "alembic_version_federation",
        missing=(
            "no federation database at {url}: run `dafne-federation init` or point "
            "DAFNE_FED_DB_URL at it"
        ),
        mismatch=(
            "the federation database is at schema revision {current}, this "
            "dafne-federation expects {head}: restart `dafne-federation serve`/`worker` "
            "with this version (they migrate it), or use the dafne-federation of the "
            "version that is running"
        ),
    ),
}
"""The schemas this package can migrate, by name (each with its own version table, so
both can live in one database)."""


def alembic_config(history: str = "node", url: str | None = None) -> Config:
    """An Alembic ``Config`` for ``history`` (no ini file needed).

    Raises
    ------
    KeyError
        For an unknown history name.
    """
    entry = HISTORIES[history]
    config = Config()
    config.set_main_option("script_location", str(entry.script_location))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision(history: str = "node") -> str:
    """The newest revision of ``history``."""
    head = ScriptDirectory.from_config(alembic_config(history)).get_current_head()
    if head is None:
        raise RuntimeError(f"migration history {history!r} has no revisions")
    return head


def current_revision(engine: Engine, history: str = "node") -> str | None:
    """The revision the database is at, or ``None`` for an empty database."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": HISTORIES[history].version_table}
        )
        return context.get_current_revision()


class SchemaMismatchError(RuntimeError):
    """The database is not at the schema this code expects; the message says what to do."""


def check_current(engine: Engine, history: str = "node") -> None:
    """Make sure the database is at this code's head revision, without changing it.

    Why: read-only commands (``status``, ``jobs retry``) run beside a running node (or
    federation server), maybe of another version. Migrating from there would change the
    schema under the running processes' feet; only the processes that own the database
    (``serve``, ``worker``) migrate.

    Raises
    ------
    SchemaMismatchError
        If the database is empty or at another revision, saying which and what to do.
    """
    entry = HISTORIES[history]
    current = current_revision(engine, history)
    head = head_revision(history)
    fields = {"current": current, "head": head,
              "url": engine.url.render_as_string(hide_password=True)}
    if current is None:
        raise SchemaMismatchError(entry.missing.format(**fields))
    if current != head:
        raise SchemaMismatchError(entry.mismatch.format(**fields))


def upgrade(
    target: Engine | str | Path, revision: str = "head", *, history: str = "node"
) -> str | None:
    """Upgrade the database behind ``target`` to ``revision``; return the new revision.

    Parameters
    ----------
    target : Engine, str or pathlib.Path
        An engine (used as is), a database URL or an SQLite file path (an engine is made
        with :func:`db.session.make_engine` and disposed of afterwards).
    revision : str
        Target revision, ``head`` by default.
    history : str
        Which schema: ``node`` or ``federation`` (see :data:`HISTORIES`).
    """
    engine = target if isinstance(target, Engine) else make_engine(target)
    try:
        before = current_revision(engine, history)
        config = alembic_config(history)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
        after = current_revision(engine, history)
        if before != after:
            LOGGER.info("database schema %s upgraded from %s to %s", history, before, after)
        return after
    finally:
        if engine is not target:
            engine.dispose()
