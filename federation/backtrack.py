"""Shorter steps: a candidate the gate rejects is tried again at a fraction of its step.

A FedBuff candidate is the current generation plus one step along the buffer's mean delta.
When the step overshoots, the gate rejects the candidate and every hospital's round of work
is thrown away, although the direction was right. The multi-hospital run showed this once
the model was half-trained: with the server learning rate that made the early generations
gain fastest, later candidates lost one site's Dice while they raised another's, and two
generations in a row were rejected (docs/federated-improvement.md).

Backtracking, as in a line search: the candidate ``current + s · (candidate - current)`` is
scored for each fraction ``s`` in turn (``[gate] step_fractions``, e.g. 0.5 then 0.25),
and the first one the gate promotes becomes the generation, with the fraction in its reason.
If none passes, the full-step candidate is rejected as before. The gate still decides on
every candidate, so a promoted shorter step holds every rule a full step must hold; each
fraction costs one more scoring of the validation set, and only when the full step failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from federation.aggregate import interpolate
from federation.gate import Gate, GateDecision, Scores

__all__ = ["Backtracked", "backtrack"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backtracked:
    """A shorter step the gate promoted."""

    fraction: float
    state: dict[str, Tensor]
    scores: Scores
    decision: GateDecision


def backtrack(current: Mapping[str, Tensor], candidate: Mapping[str, Tensor], *,
              current_scores: Scores, gate: Gate, fractions: Sequence[float],
              score: Callable[[Mapping[str, Tensor]], Scores]) -> Backtracked | None:
    """The first fraction of the step from ``current`` to ``candidate`` the gate promotes.

    Parameters
    ----------
    current, candidate:
        The current generation's weights and the rejected candidate's.
    current_scores:
        The current generation's validation scores (what the gate compares with).
    gate:
        The model's gate.
    fractions:
        Step fractions to try, in order (each in (0, 1)).
    score:
        Validation scores of a set of weights.

    Returns
    -------
    Backtracked or None
        The promoted shorter step, or None when the gate rejects every fraction.
    """
    for fraction in fractions:
        state = interpolate(candidate, current, fraction)
        scores = score(state)
        decision = gate.decide(current_scores, scores)
        LOGGER.info("step fraction %g: mean Dice %.4f: %s", fraction, scores.mean,
                    "promoted" if decision.promote else "rejected")
        if decision.promote:
            return Backtracked(fraction=fraction, state=state, scores=scores,
                               decision=decision)
    return None
