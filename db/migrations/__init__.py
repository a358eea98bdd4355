"""Alembic migration histories, one per schema: ``node`` and ``federation``."""
