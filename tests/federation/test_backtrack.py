"""Shorter steps: the first fraction of a rejected step that the gate promotes is kept."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from federation.backtrack import backtrack
from federation.gate import RelativeGate, Scores

CURRENT = {"w": torch.tensor([0.0, 0.0])}
CANDIDATE = {"w": torch.tensor([4.0, -2.0])}


def _scores(mean: float) -> Scores:
    return Scores(mean=mean, sites={"A": mean})


def _score_by_distance(best_at: float):
    """Validation Dice that peaks at ``best_at`` of the way to the candidate."""
    tried: list[float] = []

    def score(state: Mapping[str, torch.Tensor]) -> Scores:
        fraction = float(state["w"][0]) / 4.0
        tried.append(fraction)
        return _scores(0.8 - abs(fraction - best_at))
    return score, tried


def test_the_first_promoted_fraction_is_kept_with_its_weights() -> None:
    score, tried = _score_by_distance(best_at=0.2)
    shorter = backtrack(CURRENT, CANDIDATE, current_scores=_scores(0.6), gate=RelativeGate(),
                        fractions=[0.5, 0.25, 0.1], score=score)
    assert shorter is not None and shorter.fraction == 0.25
    assert tried == [0.5, 0.25]  # 0.5 scores 0.5 (rejected), 0.25 scores 0.75; 0.1 untried
    torch.testing.assert_close(shorter.state["w"], torch.tensor([1.0, -0.5]))
    assert shorter.decision.promote and shorter.scores.mean == 0.75


def test_none_when_every_fraction_is_rejected() -> None:
    score, tried = _score_by_distance(best_at=-1.0)  # every step away from here is worse
    assert backtrack(CURRENT, CANDIDATE, current_scores=_scores(0.8), gate=RelativeGate(),
                     fractions=[0.5, 0.25], score=score) is None
    assert tried == [0.5, 0.25]
