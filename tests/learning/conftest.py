"""Fixtures of the learning tests: the node stages' fixtures (a node with a spooled series)."""

from tests.node.conftest import node, segmenter

__all__ = ["node", "segmenter"]
