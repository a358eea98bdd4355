"""Revisions of the federation schema."""
