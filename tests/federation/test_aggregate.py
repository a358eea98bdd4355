"""The arithmetic of aggregation, with numbers worked out by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from federation.aggregate import (
    add_scaled,
    clip_to_norm,
    interpolate,
    l2_norm,
    staleness_weight,
    weighted_average,
)


def _t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def test_l2_norm_is_over_all_tensors_together() -> None:
    assert l2_norm({"a": _t(3.0, 0.0), "b": torch.tensor([[4.0]])}) == 5.0
    assert l2_norm({"a": _t(1.0, 1.0, dtype=torch.float16), "b": _t(1.0, 1.0)}) == 2.0
    assert l2_norm({}) == 0.0


def test_clip_scales_down_to_the_bound_and_says_so() -> None:
    tensors = {"a": _t(3.0, 0.0), "b": _t(4.0)}
    clipped, was_clipped = clip_to_norm(tensors, 2.5)
    assert was_clipped
    assert torch.allclose(clipped["a"], _t(1.5, 0.0)) and torch.allclose(clipped["b"], _t(2.0))
    assert l2_norm(clipped) == pytest.approx(2.5)
    assert torch.equal(tensors["a"], _t(3.0, 0.0))  # input untouched


def test_clip_leaves_small_updates_alone() -> None:
    tensors = {"a": _t(3.0, 0.0, dtype=torch.float16), "b": _t(4.0)}
    same, was_clipped = clip_to_norm(tensors, 5.0)
    assert not was_clipped
    assert same["a"].dtype == torch.float32
    assert torch.equal(same["a"], _t(3.0, 0.0)) and torch.equal(same["b"], _t(4.0))
    same["b"] += 1
    assert torch.equal(tensors["b"], _t(4.0))  # a copy, not the input


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.inf, math.nan])
def test_clip_refuses_a_bad_bound(max_norm: float) -> None:
    with pytest.raises(ValueError, match="max_norm"):
        clip_to_norm({"a": _t(1.0)}, max_norm)


def test_clip_refuses_non_finite_tensors() -> None:
    with pytest.raises(ValueError, match="norm of the tensors must be finite"):
        clip_to_norm({"a": _t(math.nan, 1.0)}, 1.0)


def test_staleness_weight() -> None:
    assert staleness_weight(5, 5) == 1.0
    assert staleness_weight(5, 4) == pytest.approx(1 / math.sqrt(2))
    assert staleness_weight(5, 2) == 0.5
    assert staleness_weight(1, 1) == 1.0
    with pytest.raises(ValueError, match="newer than the current generation 5"):
        staleness_weight(5, 6)
    with pytest.raises(ValueError, match=">= 1"):
        staleness_weight(5, 0)


def test_weighted_average_normalises_the_weights() -> None:
    deltas = [{"w": _t(1.0, 0.0), "b": _t(2.0)}, {"w": _t(3.0, 4.0), "b": _t(6.0)}]
    average = weighted_average(deltas, [1.0, 3.0])
    assert torch.allclose(average["w"], _t(2.5, 3.0))
    assert torch.allclose(average["b"], _t(5.0))
    scaled = weighted_average(deltas, [2.0, 6.0])
    assert all(torch.allclose(scaled[k], average[k]) for k in average)
    only_first = weighted_average(deltas, [1.0, 0.0])
    assert torch.equal(only_first["w"], _t(1.0, 0.0))


def test_weighted_average_does_not_depend_on_the_order_of_the_updates() -> None:
    """Updates arrive in any order; the same ones must make bit for bit the same candidate."""
    generator = torch.Generator().manual_seed(5)
    deltas = [{"w": torch.randn(20_000, generator=generator) * 10 ** -k} for k in range(4)]
    weights = [3.0, 1.0 / 3.0, 0.7071067811865476, 2.5]
    first = weighted_average(deltas, weights)["w"]
    for order in itertools.permutations(range(4)):
        again = weighted_average([deltas[i] for i in order], [weights[i] for i in order])
        assert torch.equal(again["w"], first), order


def test_weighted_average_computes_in_fp32() -> None:
    deltas = [{"w": _t(1e-4, dtype=torch.float16)}, {"w": _t(3e-4, dtype=torch.float16)}]
    average = weighted_average(deltas, [1.0, 1.0])
    assert average["w"].dtype == torch.float32
    assert float(average["w"]) == pytest.approx(2e-4, rel=1e-3)


@pytest.mark.parametrize(("deltas", "weights", "match"), [
    ([], [], "nothing to average"),
    ([{"w": _t(1.0)}], [1.0, 2.0], "1 deltas but 2 weights"),
    ([{"w": _t(1.0)}, {"w": _t(1.0)}], [1.0, -1.0], "negative"),
    ([{"w": _t(1.0)}, {"w": _t(1.0)}], [0.0, 0.0], "sum to zero"),
    ([{"w": _t(1.0)}], [math.nan], "finite"),
    ([{"w": _t(1.0)}, {"v": _t(1.0)}], [1.0, 1.0], r"delta 1: missing tensors \['w'\]"),
    ([{"w": _t(1.0)}, {"w": _t(1.0, 2.0)}], [1.0, 1.0], r"'w' has shape \(2,\)"),
])
def test_weighted_average_refuses(deltas: list, weights: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_average(deltas, weights)


def test_add_scaled_keeps_the_state_dtypes() -> None:
    state = {"w": _t(1.0, 2.0, dtype=torch.float16), "b": _t(10.0)}
    delta = {"w": _t(0.5, -0.5), "b": _t(4.0, dtype=torch.float16)}
    new = add_scaled(state, delta, 0.5)
    assert new["w"].dtype == torch.float16 and new["b"].dtype == torch.float32
    assert torch.equal(new["w"], _t(1.25, 1.75, dtype=torch.float16))
    assert torch.equal(new["b"], _t(12.0))
    assert torch.equal(state["w"], _t(1.0, 2.0, dtype=torch.float16))  # input untouched
    assert torch.equal(add_scaled(state, delta)["b"], _t(14.0))


def test_add_scaled_refuses_mismatches() -> None:
    with pytest.raises(ValueError, match=r"missing tensors \['b'\], unexpected \['c'\]"):
        add_scaled({"b": _t(1.0)}, {"c": _t(1.0)})
    with pytest.raises(ValueError, match="scale must be finite"):
        add_scaled({"b": _t(1.0)}, {"b": _t(1.0)}, math.inf)


def test_interpolate() -> None:
    a = {"w": _t(4.0, 0.0, dtype=torch.float16)}
    b = {"w": _t(8.0, 4.0)}
    mixed = interpolate(a, b, 0.25)
    assert mixed["w"].dtype == torch.float16
    assert torch.equal(mixed["w"], _t(7.0, 3.0, dtype=torch.float16))
    assert torch.equal(interpolate(a, b, 1.0)["w"], a["w"])
    for alpha in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            interpolate(a, b, alpha)
    with pytest.raises(ValueError, match=r"'w' has shape \(1,\)"):
        interpolate(a, {"w": _t(1.0)}, 0.5)
