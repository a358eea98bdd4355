"""Aggregation strategies on small state dicts, against numbers worked out by hand."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import pytest
import torch

from federation.strategies import (
    STRATEGIES,
    BufferedUpdate,
    DafneMerge,
    FedBuff,
    NormClipping,
    make_strategy,
)


def _t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _update(update_id: str, base: int, samples: int, *values: float) -> BufferedUpdate:
    return BufferedUpdate(update_id=update_id, delta={"w": _t(*values)}, base_generation=base,
                          num_samples=samples)


def _no_bases(generation: int) -> Mapping[str, torch.Tensor]:
    raise AssertionError(f"FedBuff must not need generation {generation}'s weights")


# Generation n of the toy model is w = 4 * (n - 1): 0, 4, 8 for generations 1, 2, 3.
GENERATIONS = {n: {"w": _t(4.0 * (n - 1))} for n in (1, 2, 3)}


def test_fedbuff_weights_by_samples_and_staleness() -> None:
    current = {"w": _t(10.0, 20.0)}
    updates = [_update("fresh", 4, 30, 3.0, 0.0),   # staleness 0: weight 30 * 1
               _update("stale", 1, 20, 0.0, 6.0)]   # staleness 3: weight 20 * 1/sqrt(4) = 10
    result = FedBuff().aggregate(current, 4, updates, _no_bases)
    assert result.weights == {"fresh": 0.75, "stale": 0.25}
    # mean delta = 0.75 * [3, 0] + 0.25 * [0, 6] = [2.25, 1.5]
    assert torch.allclose(result.state["w"], _t(12.25, 21.5))
    assert result.notes["staleness"] == {"fresh": 0, "stale": 3}
    assert result.notes["staleness_weight"] == {"fresh": 1.0, "stale": 0.5}
    assert result.notes["mean_delta_norm"] == pytest.approx(math.hypot(2.25, 1.5))
    json.dumps(result.notes)  # JSON-safe for the audit trail
    assert torch.equal(current["w"], _t(10.0, 20.0))  # input untouched


def test_fedbuff_server_learning_rate_scales_the_step() -> None:
    updates = [_update("a", 4, 30, 3.0, 0.0), _update("b", 1, 20, 0.0, 6.0)]
    result = FedBuff(server_lr=0.5).aggregate({"w": _t(10.0, 20.0)}, 4, updates, _no_bases)
    assert torch.allclose(result.state["w"], _t(11.125, 20.75))
    assert result.notes["server_lr"] == 0.5


def test_a_stale_update_counts_less_than_a_fresh_one() -> None:
    updates = [_update("fresh", 3, 10, 1.0), _update("stale", 2, 10, 1.0),
               _update("staler", 1, 10, 1.0)]
    weights = FedBuff().aggregate({"w": _t(0.0)}, 3, updates, _no_bases).weights
    raw = [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3)]
    assert weights == pytest.approx({"fresh": raw[0] / sum(raw), "stale": raw[1] / sum(raw),
                                     "staler": raw[2] / sum(raw)})
    assert weights["fresh"] > weights["stale"] > weights["staler"]


def test_fedbuff_keeps_the_model_dtype() -> None:
    result = FedBuff().aggregate({"w": _t(1.0, dtype=torch.float16)}, 1,
                                 [_update("a", 1, 1, 0.5)], _no_bases)
    assert result.state["w"].dtype == torch.float16
    assert torch.equal(result.state["w"], _t(1.5, dtype=torch.float16))


def test_dafne_merges_half_and_half_in_order() -> None:
    calls: list[int] = []

    def bases(generation: int) -> Mapping[str, torch.Tensor]:
        calls.append(generation)
        return GENERATIONS[generation]

    current = GENERATIONS[3]  # w = 8
    updates = [_update("fresh", 3, 1, 2.0),     # full model 8 + 2 = 10: latest 0.5*8 + 0.5*10 = 9
               _update("stale", 1, 1000, 1.0),  # full model 0 + 1 = 1:  latest 0.5*9 + 0.5*1 = 5
               _update("again", 1, 1, 3.0)]     # full model 0 + 3 = 3:  latest 0.5*5 + 0.5*3 = 4
    result = DafneMerge().aggregate(current, 3, updates, bases)
    assert torch.equal(result.state["w"], _t(4.0))
    assert result.weights == {"fresh": 0.125, "stale": 0.25, "again": 0.5}
    assert result.notes["current_weight"] == 0.125
    # 0.125 * 8 + 0.125 * 10 + 0.25 * 1 + 0.5 * 3 = 4
    assert calls == [3, 1]  # each base generation read once
    json.dumps(result.notes)


def test_a_stale_upload_drags_dafne_back_but_not_fedbuff() -> None:
    current = GENERATIONS[3]  # w = 8
    updates = [_update("fresh", 3, 10, 2.0), _update("stale", 1, 10, 1.0)]
    dafne = DafneMerge().aggregate(current, 3, updates, GENERATIONS.__getitem__)
    fedbuff = FedBuff().aggregate(current, 3, updates, _no_bases)
    # Dafne: 9 after the fresh upload, then 0.5 * 9 + 0.5 * (0 + 1) = 5: below the current 8,
    # although both nodes improved on their base.
    assert torch.equal(dafne.state["w"], _t(5.0))
    # FedBuff: 8 + (10 * 2 + 10/sqrt(3) * 1) / (10 + 10/sqrt(3)) = 9.634
    s = 1 / math.sqrt(3)
    assert float(fedbuff.state["w"]) == pytest.approx(8 + (20 + 10 * s) / (10 + 10 * s))
    assert float(fedbuff.state["w"]) > 8 > float(dafne.state["w"])


def test_dafne_ignores_sample_counts() -> None:
    def merged(samples: int) -> torch.Tensor:
        updates = [_update("a", 3, samples, 2.0), _update("b", 2, 1, 1.0)]
        return DafneMerge().aggregate(GENERATIONS[3], 3, updates,
                                      GENERATIONS.__getitem__).state["w"]

    assert torch.equal(merged(1), merged(1000))


@pytest.mark.parametrize("strategy", [FedBuff(), DafneMerge()])
def test_strategies_refuse_bad_buffers(strategy) -> None:
    with pytest.raises(ValueError, match="no updates"):
        strategy.aggregate(GENERATIONS[3], 3, [], GENERATIONS.__getitem__)
    with pytest.raises(ValueError, match=r"more than once: \['a'\]"):
        strategy.aggregate(GENERATIONS[3], 3, [_update("a", 3, 1, 1.0)] * 2,
                           GENERATIONS.__getitem__)
    with pytest.raises(ValueError, match=r"newer than 2: \['a'\]"):
        strategy.aggregate(GENERATIONS[2], 2, [_update("a", 3, 1, 1.0)],
                           GENERATIONS.__getitem__)
    wrong = BufferedUpdate(update_id="x", delta={"v": _t(1.0)}, base_generation=3,
                           num_samples=1)
    with pytest.raises(ValueError, match=r"missing tensors \['w'\]"):
        strategy.aggregate(GENERATIONS[3], 3, [wrong], GENERATIONS.__getitem__)


def test_buffered_update_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        _update("a", 1, 0, 1.0)
    with pytest.raises(ValueError, match="base generation must be >= 1"):
        _update("a", 0, 1, 1.0)


def test_norm_clipping_clips_each_update_and_records_it() -> None:
    updates = [_update("big", 2, 1, 3.0, 4.0), _update("small", 2, 1, 0.6, 0.8)]
    strategy = NormClipping(FedBuff(), max_norm=2.0)
    result = strategy.aggregate({"w": _t(0.0, 0.0)}, 2, updates, _no_bases)
    # "big" is scaled from norm 5 to norm 2: [1.2, 1.6]; mean with [0.6, 0.8] = [0.9, 1.2].
    assert torch.allclose(result.state["w"], _t(0.9, 1.2))
    assert result.weights == {"big": 0.5, "small": 0.5}
    assert result.notes["max_norm"] == 2.0 and result.notes["clipped"] == ["big"]
    assert result.notes["norms"] == pytest.approx({"big": 5.0, "small": 1.0})
    assert result.notes["server_lr"] == 1.0  # the wrapped strategy's notes are kept
    assert torch.equal(updates[0].delta["w"], _t(3.0, 4.0))  # inputs untouched
    json.dumps(result.notes)


def test_norm_clipping_wraps_any_strategy() -> None:
    updates = [_update("big", 3, 1, 20.0)]
    result = NormClipping(DafneMerge(), max_norm=2.0).aggregate(
        GENERATIONS[3], 3, updates, GENERATIONS.__getitem__)
    assert torch.equal(result.state["w"], _t(9.0))  # 0.5 * 8 + 0.5 * (8 + 2)
    assert result.notes["clipped"] == ["big"] and result.notes["current_weight"] == 0.5
    with pytest.raises(ValueError, match="max_norm"):
        NormClipping(FedBuff(), max_norm=0.0)


def test_make_strategy() -> None:
    assert set(STRATEGIES) == {"fedbuff", "dafne"}
    assert isinstance(make_strategy("dafne"), DafneMerge)
    fedbuff = make_strategy("fedbuff", server_lr=0.5)
    assert isinstance(fedbuff, FedBuff) and fedbuff.server_lr == 0.5
    clipped = make_strategy("fedbuff", max_norm=3.0)
    assert isinstance(clipped, NormClipping) and clipped.max_norm == 3.0
    assert isinstance(clipped.strategy, FedBuff)


def test_make_strategy_errors() -> None:
    with pytest.raises(ValueError, match="unknown aggregation strategy 'fedavg'; valid: "
                                         "dafne, fedbuff"):
        make_strategy("fedavg")
    with pytest.raises(ValueError, match=r"strategy 'dafne': DafneMerge\(\) takes no arguments"):
        make_strategy("dafne", server_lr=0.5)
    with pytest.raises(ValueError, match="server_lr must be positive"):
        make_strategy("fedbuff", server_lr=-1.0)
    with pytest.raises(ValueError, match="max_norm must be positive"):
        make_strategy("fedbuff", max_norm=-1.0)
    with pytest.raises(TypeError):
        FedBuff(1.0)  # type: ignore[misc]  # keyword-only
