"""Throw-away PostgreSQL schemas for tests, on the server at 127.0.0.1:5432 (or DAFNE_TEST_PG_URL).

Each user gets its own schema, dropped afterwards, so concurrent test runs on the shared
server never see each other's tables. Tests skip, with the reason, where no server answers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from db.session import make_engine

PG_URL = os.environ.get("DAFNE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def temporary_schema(prefix: str) -> Iterator[str]:
    """Create a uniquely named schema, yield its name, drop it with everything in it."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = make_engine(PG_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {str(exc.orig).splitlines()[0]}")
    try:
        yield schema
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
