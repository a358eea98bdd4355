"""Screening (reject on negative influence) on a toy model whose validation score is known.

The toy's weights are one number ``w`` and its "validation Dice" is ``1 - |w - 1|``: the
current generation sits at ``w = 0`` and good updates point towards 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import torch

from federation.gate import Scores
from federation.screening import leave_one_out, screen
from federation.strategies import AggregationResult, BufferedUpdate, FedBuff

CURRENT = {"w": torch.tensor([0.0])}


def _update(update_id: str, delta: float, samples: int = 1) -> BufferedUpdate:
    return BufferedUpdate(update_id=update_id, delta={"w": torch.tensor([delta])},
                          base_generation=1, num_samples=samples)


def _build(updates: Sequence[BufferedUpdate]) -> AggregationResult:
    return FedBuff().aggregate(CURRENT, 1, updates, lambda n: CURRENT)


class _Scorer:
    """The toy's validation score, counting how often the validation set was scored."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, state: Mapping[str, torch.Tensor]) -> Scores:
        self.calls += 1
        dice = 1.0 - abs(float(state["w"][0]) - 1.0)
        return Scores(mean=dice, sites={"A": dice})


def test_the_update_that_drags_the_candidate_down_is_refused_with_its_influence() -> None:
    scorer = _Scorer()
    updates = [_update("good-1", 0.9), _update("good-2", 1.1), _update("flipped", -2.0)]

    result = screen(updates, build=_build, score=scorer, max_influence_drop=0.005)

    assert [u.update_id for u in result.kept] == ["good-1", "good-2"]
    assert list(result.refused) == ["flipped"]
    assert "0.0000 with this update and 1.0000 without it" in result.refused["flipped"]
    assert float(result.candidate.state["w"][0]) == pytest.approx(1.0)
    assert result.scores.mean == pytest.approx(1.0)
    # all, each left out, the candidate of the rest, each of the rest left out (none refused)
    assert scorer.calls == 1 + 3 + 1 + 2
    assert sorted(i.update_id for i in result.influences) == ["good-1", "good-2"]


def test_a_harmful_update_that_looks_helpful_beside_a_wreck_is_refused_as_without_it() -> None:
    # Without the wreck, "stale" (it overshoots) lowers the candidate and is refused. Beside
    # the wreck the candidate is so far off that "stale" pulls it back a little and measures
    # helpful; the second pass, among the kept updates, refuses it as the clean buffer does.
    updates = [_update("good-1", 0.9), _update("good-2", 1.1), _update("stale", 2.5)]
    clean = screen(updates, build=_build, score=_Scorer(), max_influence_drop=0.005)
    scorer = _Scorer()

    poisoned = screen([*updates, _update("wreck", -10.0)], build=_build, score=scorer,
                      max_influence_drop=0.005)

    assert list(clean.refused) == ["stale"]
    assert list(poisoned.refused) == ["wreck", "stale"]
    assert "-1.3750 with this update and 0.5000 without it" in poisoned.refused["wreck"]
    assert [u.update_id for u in poisoned.kept] == [u.update_id for u in clean.kept]
    assert float(poisoned.candidate.state["w"][0]) == float(clean.candidate.state["w"][0])
    assert poisoned.scores.mean == pytest.approx(1.0)
    assert scorer.calls == (1 + 4) + (1 + 3) + (1 + 2)  # three passes: 4, 3 and 2 updates


def test_a_new_sites_update_that_costs_the_others_a_little_is_kept() -> None:
    # Two sites: "A" is best at w = 1, the new site "C" at w = -1. The C hospital's update
    # lowers the mean (A loses a little) but raises site C by more than that.
    def two_sites(state: Mapping[str, torch.Tensor]) -> Scores:
        w = float(state["w"][0])
        a, c = 1.0 - abs(w - 1.0) / 3, max(0.0, 1.0 - abs(w + 1.0) / 4)
        return Scores(mean=(a + c) / 2, sites={"A": a, "C": c})
    updates = [_update("a-1", 1.0), _update("a-2", 1.0), _update("site-c", -0.6)]

    result = screen(updates, build=_build, score=two_sites, max_influence_drop=0.005)

    (site_c,) = (i for i in result.influences if i.update_id == "site-c")
    assert site_c.change < -0.005 and site_c.best_site_gain > -site_c.change
    assert result.refused == {}


def test_repeated_passes_never_refuse_more_than_half_of_the_buffer() -> None:
    # The first pass refuses the two that overshoot most; among the other two, "u-1.6" then
    # measures harmful too, but refusing it would refuse three of four: it is kept.
    updates = [_update("u-1.0", 1.0), _update("u-1.6", 1.6), _update("u-2.2", 2.2),
               _update("u-2.8", 2.8)]

    result = screen(updates, build=_build, score=_Scorer(), max_influence_drop=0.005)

    assert sorted(result.refused) == ["u-2.2", "u-2.8"]
    assert [u.update_id for u in result.kept] == ["u-1.0", "u-1.6"]
    (second,) = (i for i in result.influences if i.update_id == "u-1.6")
    assert second.helps_nobody(0.005), "the second pass measured it harmful"


def test_a_site_scoring_near_zero_that_moves_a_little_is_no_excuse() -> None:
    # The wreck drags site A down by 0.6 and moves site C, near zero, up by 0.01.
    def two_sites(state: Mapping[str, torch.Tensor]) -> Scores:
        w = float(state["w"][0])
        a, c = max(0.0, 1.0 - abs(w - 1.0)), min(0.02, max(0.0, -0.02 * w))
        return Scores(mean=(a + c) / 2, sites={"A": a, "C": c})
    updates = [_update("good", 1.0), _update("wreck", -2.0)]

    result = screen(updates, build=_build, score=two_sites, max_influence_drop=0.005)

    assert list(result.refused) == ["wreck"]
    influences = leave_one_out(updates, two_sites(_build(updates).state), build=_build,
                               score=two_sites)
    (wreck,) = (i for i in influences if i.update_id == "wreck")
    assert wreck.best_site_gain > 0.005


def test_a_single_update_is_left_to_the_gate() -> None:
    scorer = _Scorer()
    result = screen([_update("alone", -2.0)], build=_build, score=scorer,
                    max_influence_drop=0.005)
    assert [u.update_id for u in result.kept] == ["alone"]
    assert result.refused == {}
    assert scorer.calls == 1


def test_a_slightly_negative_influence_within_the_allowance_is_kept() -> None:
    # With both, w = 1.01 (score 0.99); without "overshoot", w = 1 (score 1): 0.01 lower.
    updates = [_update("good", 1.0), _update("overshoot", 1.02)]
    kept = screen(updates, build=_build, score=_Scorer(), max_influence_drop=0.02)
    refused = screen(updates, build=_build, score=_Scorer(), max_influence_drop=0.005)
    assert kept.refused == {}
    assert list(refused.refused) == ["overshoot"]


def test_when_every_update_measures_harmful_none_is_refused_and_the_gate_decides() -> None:
    # Two updates that each score well alone and badly mixed: on this score the mix
    # (0.5, 0.5) is worse than either alone, so each one's absence helps.
    def one_axis(state: Mapping[str, torch.Tensor]) -> Scores:
        dice = 1.0 - float(state["w"].abs().min())
        return Scores(mean=dice, sites={"A": dice})
    current = {"w": torch.tensor([0.0, 0.0])}
    updates = [BufferedUpdate(update_id=name, delta={"w": torch.tensor(delta)},
                              base_generation=1, num_samples=1)
               for name, delta in (("x", [1.0, 0.0]), ("y", [0.0, 1.0]))]

    result = screen(updates, build=lambda kept: FedBuff().aggregate(current, 1, kept,
                                                                    lambda n: current),
                    score=one_axis, max_influence_drop=0.005)

    assert result.refused == {}
    assert [u.update_id for u in result.kept] == ["x", "y"]
    assert [i.change for i in result.influences] == [pytest.approx(-0.5)] * 2


def test_scores_without_a_number_refuse_nothing() -> None:
    def nan_scores(state: Mapping[str, torch.Tensor]) -> Scores:
        return Scores(mean=float("nan"), sites={})
    result = screen([_update("a", 1.0), _update("b", -3.0)], build=_build, score=nan_scores,
                    max_influence_drop=0.005)
    assert result.refused == {}


def test_a_negative_allowance_is_refused() -> None:
    with pytest.raises(ValueError, match="max_influence_drop"):
        screen([_update("a", 1.0)], build=_build, score=_Scorer(), max_influence_drop=-1)


def test_screening_off_builds_and_scores_the_candidate_of_all_updates() -> None:
    scorer = _Scorer()
    result = screen([_update("good", 1.0), _update("flipped", -3.0)], build=_build,
                    score=scorer, max_influence_drop=None)
    assert [u.update_id for u in result.kept] == ["good", "flipped"]
    assert scorer.calls == 1
