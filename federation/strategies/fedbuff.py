"""FedBuff: buffered asynchronous aggregation with a staleness discount.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation" (AISTATS 2022).
Nodes train whenever they have corrections, against whatever generation they last pulled,
so updates arrive at any time and against different bases. FedBuff buffers them and then
applies their weighted mean *to the current model*::

    new = current + server_lr * sum_i w_i * delta_i,
    w_i proportional to num_samples_i * 1 / sqrt(1 + current_generation - base_i)

A delta is a direction of improvement found near its base; applied to the current model it
still points mostly the right way, but the further behind its base, the less it is
trusted. Weighting by samples makes a node that trained on 40 series count more than one
that trained on 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch

from federation.aggregate import add_scaled, l2_norm, staleness_weight, weighted_average
from federation.strategies.base import (
    AggregationResult,
    BufferedUpdate,
    Strategy,
    check_updates,
)

__all__ = ["FedBuff"]


class FedBuff(Strategy):
    """Sample- and staleness-weighted mean of the buffered deltas, added to the current model.

    Parameters
    ----------
    server_lr:
        Server learning rate: the step along the mean delta (1.0 applies it as it is).

    Raises
    ------
    ValueError
        If ``server_lr`` is not positive and finite.
    """

    name: ClassVar[str] = "fedbuff"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be positive and finite, not {server_lr}")
        self.server_lr = server_lr

    def __repr__(self) -> str:
        """Name and settings, for logs."""
        return f"FedBuff(server_lr={self.server_lr})"

    def aggregate(self, current: Mapping[str, torch.Tensor], current_generation: int,
                  updates: Sequence[BufferedUpdate],
                  base_weights: Callable[[int], Mapping[str, torch.Tensor]],
                  ) -> AggregationResult:
        """``current + server_lr * weighted mean of the deltas`` (``base_weights`` unused)."""
        check_updates(updates, current_generation)
        staleness = {u.update_id: staleness_weight(current_generation, u.base_generation)
                     for u in updates}
        raw = [u.num_samples * staleness[u.update_id] for u in updates]
        total = math.fsum(raw)
        mean = weighted_average([u.delta for u in updates], raw)
        state = add_scaled(current, mean, self.server_lr)
        return AggregationResult(
            state=state,
            weights={u.update_id: w / total for u, w in zip(updates, raw, strict=True)},
            notes={"server_lr": self.server_lr,
                   "staleness": {u.update_id: current_generation - u.base_generation
                                 for u in updates},
                   "staleness_weight": staleness,
                   "mean_delta_norm": l2_norm(mean)})
