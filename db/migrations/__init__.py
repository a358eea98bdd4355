"""Alembic migration histories, one per schema (``node``; the federation server adds its own)."""
