"""Lifting the weakest site, on a toy model whose per-site validation Dice is known.

The toy's weights are one number ``w``. Site A is best at ``w = 1``, site C (the hospital
with the unusual protocol) at ``w = -1``; the current generation sits at ``w = 0``. Two
site-A hospitals push towards 1, the site-C hospital towards -1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pytest
import torch

from federation.fairness import lift_weakest_site, weakest_site
from federation.gate import Scores
from federation.screening import Screening, screen
from federation.strategies import AggregationResult, BufferedUpdate, FedBuff

CURRENT = {"w": torch.tensor([0.0])}


def _update(update_id: str, delta: float, samples: int = 4) -> BufferedUpdate:
    return BufferedUpdate(update_id=update_id, delta={"w": torch.tensor([delta])},
                          base_generation=1, num_samples=samples)


def _build(updates: Sequence[BufferedUpdate]) -> AggregationResult:
    return FedBuff().aggregate(CURRENT, 1, updates, lambda n: CURRENT)


class _TwoSites:
    """Site A's Dice falls by ``1/a_width`` per unit of ``w`` away from 1, site C's likewise."""

    def __init__(self, a_width: float, c_width: float) -> None:
        self.a_width, self.c_width = a_width, c_width
        self.calls = 0

    def __call__(self, state: Mapping[str, torch.Tensor]) -> Scores:
        self.calls += 1
        w = float(state["w"][0])
        a = max(0.0, 1.0 - abs(w - 1.0) / self.a_width)
        c = max(0.0, 1.0 - abs(w + 1.0) / self.c_width)
        return Scores(mean=(a + c) / 2, sites={"A": a, "C": c})


UPDATES = [_update("a-1", 1.0), _update("a-2", 1.0), _update("site-c", -0.6)]


def _screened(score: Callable[[Mapping[str, torch.Tensor]], Scores]) -> Screening:
    return screen(UPDATES, build=_build, score=score, max_influence_drop=0.005)


def test_the_update_that_helps_the_weakest_site_counts_more_when_that_lifts_it() -> None:
    score = _TwoSites(a_width=3.0, c_width=2.0)  # site C is steep: a little help goes far
    screening = _screened(score)
    assert weakest_site(screening.scores) == "C" and screening.refused == {}
    calls = score.calls

    lifted, lift = lift_weakest_site(screening, build=_build, score=score, factors=(2, 3),
                                     max_mean_cost=0.005)

    assert lift is not None and lift.update_id == "site-c" and lift.site == "C"
    assert score.calls == calls + 2  # one scoring per factor
    # FedBuff weights the candidate by samples: site C's update now counts 3 of 5 (factor 3).
    assert lift.factor == 3
    assert lifted.candidate.weights["site-c"] == pytest.approx(3 * 4 / (3 * 4 + 8))
    assert float(lifted.candidate.state["w"][0]) == pytest.approx((2 - 3 * 0.6) / 5)
    assert lifted.scores.sites["C"] > screening.scores.sites["C"]
    assert lifted.scores.mean >= screening.scores.mean - 0.005
    assert [u.update_id for u in lifted.kept] == ["a-1", "a-2", "site-c"]
    assert [u.num_samples for u in lifted.kept] == [4, 4, 4]  # the record is not rewritten
    assert lift.describe().startswith("update site-c counted 3x for the weakest site C (site C ")


def test_a_lift_that_costs_the_mean_more_than_allowed_leaves_the_plain_candidate() -> None:
    score = _TwoSites(a_width=3.0, c_width=4.0)  # site C is flat: its gain costs A more
    screening = _screened(score)
    assert weakest_site(screening.scores) == "C"

    kept, lift = lift_weakest_site(screening, build=_build, score=score, factors=(2,),
                                   max_mean_cost=0.005)

    assert lift is None and kept is screening


def test_a_more_generous_allowance_buys_the_weakest_site_its_lift() -> None:
    score = _TwoSites(a_width=3.0, c_width=4.0)
    screening = _screened(score)

    kept, lift = lift_weakest_site(screening, build=_build, score=score, factors=(2,),
                                   max_mean_cost=0.2)

    assert lift is not None and lift.factor == 2
    assert kept.scores.sites["C"] > screening.scores.sites["C"]
    assert kept.scores.mean < screening.scores.mean


def test_a_lift_that_leaves_another_site_lower_still_is_not_made() -> None:
    # Site A is steep: counting site C's update twice raises site C (0.633 -> 0.700) but
    # drops site A below where site C was (0.644 -> 0.467): the lowest site falls.
    score = _TwoSites(a_width=1.5, c_width=4.0)
    screening = _screened(score)
    assert weakest_site(screening.scores) == "C"

    kept, lift = lift_weakest_site(screening, build=_build, score=score, factors=(2,),
                                   max_mean_cost=1.0)

    assert lift is None and kept is screening


def test_nothing_is_rebuilt_when_no_update_helps_the_weakest_site() -> None:
    score = _TwoSites(a_width=3.0, c_width=2.0)
    only_a = [_update("a-1", 1.0), _update("a-2", 1.0)]
    screening = screen(only_a, build=_build, score=score, max_influence_drop=0.005)
    calls = score.calls

    kept, lift = lift_weakest_site(screening, build=_build, score=score, factors=(2, 3),
                                   max_mean_cost=0.005)

    assert lift is None and kept is screening and score.calls == calls


def test_without_influences_there_is_nothing_to_go_by() -> None:
    score = _TwoSites(a_width=3.0, c_width=2.0)
    unscreened = screen(UPDATES, build=_build, score=score, max_influence_drop=None)

    kept, lift = lift_weakest_site(unscreened, build=_build, score=score, factors=(2,),
                                   max_mean_cost=0.005)

    assert lift is None and kept is unscreened


def test_beside_a_refused_update_the_lift_uses_influences_measured_without_it() -> None:
    # Beside the wreck the candidate scores 0 on site C with or without site C's update, so
    # influences measured beside it show no helper for site C; screening's last pass measured
    # them among the kept updates, where site C's update is the one that raises it, as in
    # the clean buffer.
    score = _TwoSites(a_width=3.0, c_width=2.0)
    updates = [*UPDATES, _update("wreck", 9.0)]
    screening = screen(updates, build=_build, score=score, max_influence_drop=0.005)
    assert list(screening.refused) == ["wreck"]
    assert [i.update_id for i in screening.influences] == ["a-1", "a-2", "site-c"]
    calls = score.calls

    kept, lift = lift_weakest_site(screening, build=_build, score=score, factors=(3,),
                                   max_mean_cost=0.005)

    assert lift is not None and lift.update_id == "site-c"
    assert score.calls == calls + 1  # factor 3 only: nothing measured again
    clean, clean_lift = lift_weakest_site(_screened(_TwoSites(3.0, 2.0)), build=_build,
                                          score=_TwoSites(3.0, 2.0), factors=(3,),
                                          max_mean_cost=0.005)
    assert clean_lift is not None
    assert float(kept.candidate.state["w"][0]) == float(clean.candidate.state["w"][0])


@pytest.mark.parametrize(("factors", "cost", "message"), [
    ((1,), 0.005, "every factor must be at least 2"),
    ((2,), -0.1, "max_mean_cost must be >= 0"),
    ((2,), float("nan"), "max_mean_cost must be >= 0"),
])
def test_settings_that_make_no_sense_are_refused_by_name(
        factors: tuple[int, ...], cost: float, message: str) -> None:
    screening = _screened(_TwoSites(a_width=3.0, c_width=2.0))
    with pytest.raises(ValueError, match=message):
        lift_weakest_site(screening, build=_build, score=_TwoSites(3.0, 2.0), factors=factors,
                          max_mean_cost=cost)


def test_the_weakest_site_ignores_sites_that_were_not_scored() -> None:
    assert weakest_site(Scores(mean=0.5, sites={"A": 0.9, "B": float("nan"), "C": 0.4})) == "C"
    assert weakest_site(Scores(mean=0.5, sites={"B": 0.4, "A": 0.4})) == "A"
    assert weakest_site(Scores(mean=float("nan"), sites={})) is None
