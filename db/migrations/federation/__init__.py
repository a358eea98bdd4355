"""Alembic history of the federation schema (run through :func:`db.migrate.upgrade`)."""
