"""Norm clipping as a wrapper around any strategy.

An update's L2 norm bounds how far it can move the model. Clipping every delta to
``max_norm`` before aggregation limits what one faulty or hostile node can do, whatever the
rule that then combines the deltas; so it wraps a strategy instead of being part of one.
(Updates with absurd norms are refused at intake; clipping handles the merely large ones.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch

from federation.aggregate import clip_to_norm, l2_norm
from federation.strategies.base import AggregationResult, BufferedUpdate, Strategy

__all__ = ["NormClipping"]


class NormClipping(Strategy):
    """Clip each update's delta to ``max_norm``, then aggregate with ``strategy``.

    Parameters
    ----------
    strategy:
        The strategy that combines the clipped updates.
    max_norm:
        Largest L2 norm of one delta (all its tensors together).

    Raises
    ------
    ValueError
        If ``max_norm`` is not positive and finite.
    """

    name: ClassVar[str] = "clipping"

    def __init__(self, strategy: Strategy, *, max_norm: float) -> None:
        if not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be positive and finite, not {max_norm}")
        self.strategy = strategy
        self.max_norm = max_norm

    def __repr__(self) -> str:
        """The wrapped strategy and the bound, for logs."""
        return f"NormClipping({self.strategy!r}, max_norm={self.max_norm})"

    def aggregate(self, current: Mapping[str, torch.Tensor], current_generation: int,
                  updates: Sequence[BufferedUpdate],
                  base_weights: Callable[[int], Mapping[str, torch.Tensor]],
                  ) -> AggregationResult:
        """Clip, delegate, and add to the notes ``max_norm``, ``clipped`` (ids) and ``norms``.

        ``norms`` are the L2 norms of the deltas as received, before clipping.
        """
        clipped_ids: list[str] = []
        norms: dict[str, float] = {}
        clipped_updates = []
        for update in updates:
            norms[update.update_id] = l2_norm(update.delta)
            delta, clipped = clip_to_norm(update.delta, self.max_norm)
            if clipped:
                clipped_ids.append(update.update_id)
            clipped_updates.append(dataclasses.replace(update, delta=delta))
        result = self.strategy.aggregate(current, current_generation, clipped_updates,
                                         base_weights)
        return dataclasses.replace(result, notes={
            **result.notes, "max_norm": self.max_norm, "clipped": clipped_ids, "norms": norms})
