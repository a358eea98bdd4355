"""Aggregation strategies, one file each, and the names they are configured by.

``fedbuff`` is the federation's rule; ``dafne`` is Dafne's original merge, kept to compare
against. Either can be wrapped in :class:`NormClipping`.
"""

from __future__ import annotations

from typing import Any

from federation.strategies.base import (
    AggregationResult,
    BufferedUpdate,
    Strategy,
    check_updates,
)
from federation.strategies.clipping import NormClipping
from federation.strategies.dafne import DafneMerge
from federation.strategies.fedbuff import FedBuff

__all__ = [
    "STRATEGIES",
    "AggregationResult",
    "BufferedUpdate",
    "DafneMerge",
    "FedBuff",
    "NormClipping",
    "Strategy",
    "check_updates",
    "make_strategy",
]

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedBuff, DafneMerge)}


def make_strategy(name: str, *, max_norm: float | None = None, **options: Any) -> Strategy:
    """The strategy configured by ``name`` and its options, clipped when ``max_norm`` is set.

    Parameters
    ----------
    name:
        A key of :data:`STRATEGIES`.
    max_norm:
        If given, wrap the strategy in :class:`NormClipping` with this bound.
    **options:
        Keyword arguments of the strategy's constructor (e.g. ``server_lr`` for FedBuff).

    Raises
    ------
    ValueError
        If the name is unknown (the message lists the valid ones) or an option is not one
        the strategy takes or has an invalid value.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown aggregation strategy {name!r}; valid: "
                         f"{', '.join(sorted(STRATEGIES))}") from None
    try:
        strategy = cls(**options)
    except TypeError as exc:
        raise ValueError(f"strategy {name!r}: {exc}") from None
    return strategy if max_norm is None else NormClipping(strategy, max_norm=max_norm)
