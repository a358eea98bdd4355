"""Revisions of the node schema."""
