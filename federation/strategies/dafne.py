"""Dafne's own merge rule, kept as the baseline to compare FedBuff with.

The original Dafne server merges each uploaded model into the latest one as it arrives::

    latest = 0.5 * latest + 0.5 * (base_weights(base_i) + delta_i)

It is simple and worked while few nodes uploaded rarely, which is why it is the baseline.
What is wrong with it:

* A stale upload drags the model back. The node's full model is its *old* base plus its
  delta, so averaging it in pulls the latest model halfway back towards that old base,
  undoing half of every generation since.
* Every upload weighs the same, whether it trained on 2 series or 40, and the latest
  upload always gets half the model: the last node to upload dominates, and the weight of
  earlier ones halves with every later upload.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch

from federation.aggregate import add_scaled, interpolate
from federation.strategies.base import (
    AggregationResult,
    BufferedUpdate,
    Strategy,
    check_updates,
)

__all__ = ["DafneMerge"]


class DafneMerge(Strategy):
    """Average each node's full model into the latest, one upload at a time, half and half."""

    name: ClassVar[str] = "dafne"

    def __repr__(self) -> str:
        """Name, for logs."""
        return "DafneMerge()"

    def aggregate(self, current: Mapping[str, torch.Tensor], current_generation: int,
                  updates: Sequence[BufferedUpdate],
                  base_weights: Callable[[int], Mapping[str, torch.Tensor]],
                  ) -> AggregationResult:
        """Merge the updates in order; ``weights`` is each one's share of the result.

        The shares of the updates add up to ``1 - 0.5 ** len(updates)``; the rest, recorded
        as ``notes["current_weight"]``, is the current model's.
        """
        check_updates(updates, current_generation)
        bases: dict[int, Mapping[str, torch.Tensor]] = {}
        latest: Mapping[str, torch.Tensor] = current
        for update in updates:
            if update.base_generation not in bases:
                bases[update.base_generation] = base_weights(update.base_generation)
            full = add_scaled(bases[update.base_generation], update.delta)
            latest = interpolate(latest, full, 0.5)
        count = len(updates)
        return AggregationResult(
            state=dict(latest),
            weights={u.update_id: 0.5 ** (count - i) for i, u in enumerate(updates)},
            notes={"current_weight": 0.5 ** count,
                   "staleness": {u.update_id: current_generation - u.base_generation
                                 for u in updates}})
