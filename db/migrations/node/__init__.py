"""Alembic history of the node schema (run through :func:`db.migrate.upgrade`)."""
