"""The arithmetic of aggregation, as pure functions on state dicts.

Strategies (:mod:`federation.strategies`) are written in terms of these functions, so the
math is tested on its own, without a database, files or a server. Every function returns
new tensors and leaves its inputs alone; sums are computed in fp32 whatever the stored
dtypes (the weighted mean of updates in fp64, see :func:`weighted_average`), and every
mismatch of tensor names or shapes is a ``ValueError`` naming the tensor: averaging tensors
of different models must never happen quietly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "add_scaled",
    "clip_to_norm",
    "interpolate",
    "l2_norm",
    "staleness_weight",
    "weighted_average",
]

Tensors = Mapping[str, torch.Tensor]


def _check_same(reference: Tensors, other: Tensors, what: str) -> None:
    """Refuse ``other`` unless it has exactly the tensors of ``reference``, shape for shape."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise ValueError(f"{what}: missing tensors {missing[:5]}, unexpected {extra[:5]}")
    for name, ref in reference.items():
        if tuple(other[name].shape) != tuple(ref.shape):
            raise ValueError(f"{what}: tensor {name!r} has shape {tuple(other[name].shape)}, "
                             f"expected {tuple(ref.shape)}")


def _check_finite_number(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, not {value}")


def l2_norm(tensors: Tensors) -> float:
    """The L2 norm of all tensors together, as if flattened into one vector (fp64 sum)."""
    total = sum(float(t.detach().double().square().sum()) for t in tensors.values())
    return math.sqrt(total)


def clip_to_norm(tensors: Tensors, max_norm: float) -> tuple[dict[str, torch.Tensor], bool]:
    """Scale the tensors down so that their joint L2 norm is at most ``max_norm``.

    Clipping bounds how far one update can move the model, whatever a node sends.

    Returns
    -------
    tuple[dict[str, torch.Tensor], bool]
        fp32 copies (scaled when needed) and whether they were scaled.

    Raises
    ------
    ValueError
        If ``max_norm`` is not positive and finite, or the tensors hold NaN/Inf.
    """
    _check_finite_number(max_norm, "max_norm")
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, not {max_norm}")
    norm = l2_norm(tensors)
    _check_finite_number(norm, "the norm of the tensors")
    factor = max_norm / norm if norm > max_norm else 1.0
    return {name: t.detach().float() * factor for name, t in tensors.items()}, factor < 1.0


def staleness_weight(current_generation: int, base_generation: int) -> float:
    """FedBuff's staleness discount ``1 / sqrt(1 + current - base)``.

    An update against the current generation weighs 1, one a generation behind 0.71,
    three behind 0.5: stale deltas still count, but less.

    Raises
    ------
    ValueError
        If ``base_generation`` is below 1 or newer than ``current_generation``.
    """
    if base_generation < 1:
        raise ValueError(f"base generation must be >= 1, not {base_generation}")
    if base_generation > current_generation:
        raise ValueError(f"base generation {base_generation} is newer than the current "
                         f"generation {current_generation}")
    return 1.0 / math.sqrt(1 + current_generation - base_generation)


def weighted_average(deltas: Sequence[Tensors],
                     weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i * delta_i / sum_i w_i`` per tensor, returned in fp32.

    The sum is accumulated in fp64 and rounded to fp32 once, so the mean does not depend
    on the order of ``deltas`` (in fp32, ``a + b + c`` and ``c + a + b`` differ in the last
    bits, and a training run from either candidate then drifts apart). The same updates,
    in whatever order they arrived, make the same candidate, and a run repeats.

    Raises
    ------
    ValueError
        If there are no deltas, the counts differ, a weight is negative or not finite, the
        weights sum to zero, or the deltas differ in tensor names or shapes.
    """
    if not deltas:
        raise ValueError("nothing to average")
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    for weight in weights:
        _check_finite_number(weight, "a weight")
        if weight < 0:
            raise ValueError(f"weights must not be negative: {weight}")
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError("the weights sum to zero")
    for index, delta in enumerate(deltas[1:], start=1):
        _check_same(deltas[0], delta, f"delta {index}")
    return {name: (sum((delta[name].detach().double() * weight
                        for delta, weight in zip(deltas, weights, strict=True)),
                       start=torch.zeros_like(first, dtype=torch.float64)) / total).float()
            for name, first in deltas[0].items()}


def add_scaled(state: Tensors, delta: Tensors, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``state + scale * delta`` per tensor, computed in fp32, stored in ``state``'s dtypes.

    Raises
    ------
    ValueError
        If ``scale`` is not finite or the tensors differ in names or shapes.
    """
    _check_finite_number(scale, "scale")
    _check_same(state, delta, "delta")
    return {name: (base.detach().float() + delta[name].detach().to(base.device).float()
                   * scale).to(base.dtype) for name, base in state.items()}


def interpolate(a: Tensors, b: Tensors, alpha: float) -> dict[str, torch.Tensor]:
    """``alpha * a + (1 - alpha) * b`` per tensor, computed in fp32, stored in ``a``'s dtypes.

    Raises
    ------
    ValueError
        If ``alpha`` is outside [0, 1] or the tensors differ in names or shapes.
    """
    _check_finite_number(alpha, "alpha")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    _check_same(a, b, "second state")
    return {name: (alpha * t.detach().float() + (1 - alpha) * b[name].detach().to(t.device)
                   .float()).to(t.dtype) for name, t in a.items()}
