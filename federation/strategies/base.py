"""What every aggregation strategy takes and gives: buffered updates in, a candidate out.

A strategy is a small object with one method, :meth:`Strategy.aggregate`, that turns the
current root generation and a buffer of decoded updates into the weights of a candidate
generation. It does no I/O: the worker hands it tensors and a way to get an older
generation's weights, and stores what it returns. Features such as norm clipping wrap a
strategy (:class:`federation.strategies.clipping.NormClipping`) instead of subclassing it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["AggregationResult", "BufferedUpdate", "Strategy", "check_updates"]


@dataclass(frozen=True)
class BufferedUpdate:
    """A decoded, accepted update waiting in the buffer.

    Attributes
    ----------
    update_id:
        The update's id (``fed_updates.id``).
    delta:
        Dense fp32 tensors keyed like the model's ``state_dict``.
    base_generation:
        Promoted generation the delta is against (>= 1).
    num_samples:
        Labelled series the node trained on (>= 1).
    """

    update_id: str
    delta: Mapping[str, torch.Tensor]
    base_generation: int
    num_samples: int

    def __post_init__(self) -> None:
        """Refuse counts that no accepted update can have."""
        if self.base_generation < 1:
            raise ValueError(f"update {self.update_id}: base generation must be >= 1, not "
                             f"{self.base_generation}")
        if self.num_samples < 1:
            raise ValueError(f"update {self.update_id}: num_samples must be >= 1, not "
                             f"{self.num_samples}")


@dataclass(frozen=True)
class AggregationResult:
    """The weights of a candidate generation and how they were made.

    Attributes
    ----------
    state:
        The candidate's ``state_dict``, in the current generation's dtypes.
    weights:
        Each update's effective weight in the result, by update id.
    notes:
        JSON-safe facts for the audit trail (staleness, norms, clipped ids, …).
    """

    state: dict[str, torch.Tensor]
    weights: dict[str, float]
    notes: dict[str, Any]


def check_updates(updates: Sequence[BufferedUpdate], current_generation: int) -> None:
    """Refuse an empty buffer, repeated update ids and bases newer than the current model.

    Raises
    ------
    ValueError
        Naming the problem.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    counts = Counter(update.update_id for update in updates)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        raise ValueError(f"updates appear more than once: {repeated[:5]}")
    newer = [u.update_id for u in updates if u.base_generation > current_generation]
    if newer:
        raise ValueError(f"updates against a generation newer than {current_generation}: "
                         f"{newer[:5]}")


class Strategy(ABC):
    """An aggregation rule: current model plus buffered updates gives a candidate."""

    name: ClassVar[str]
    """Name under which the strategy is configured and recorded."""

    @abstractmethod
    def aggregate(self, current: Mapping[str, torch.Tensor], current_generation: int,
                  updates: Sequence[BufferedUpdate],
                  base_weights: Callable[[int], Mapping[str, torch.Tensor]],
                  ) -> AggregationResult:
        """Build a candidate from the current generation and the buffered updates.

        Parameters
        ----------
        current:
            ``state_dict`` of the latest promoted generation.
        current_generation:
            Its number.
        updates:
            Buffered updates, in the order they were received.
        base_weights:
            ``base_weights(n)`` returns promoted generation ``n``'s ``state_dict``; only
            strategies that rebuild each node's full model need it.

        Returns
        -------
        AggregationResult
            The candidate's weights, each update's weight and notes.

        Raises
        ------
        ValueError
            If the updates cannot be aggregated (none, repeated ids, tensors that do not
            match the model).
        """
