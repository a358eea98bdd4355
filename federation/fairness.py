"""Lift the weakest site: count more the update that helps the site the candidate serves worst.

FedBuff weighs each update by the series its node trained on. A hospital whose protocol
differs from the others' (site C's Dixon water images, where muscle is bright and fat dark)
raises its own site while the other hospitals' updates pull the shared network back towards
their contrast. In the multi-hospital run (``docs/federated-improvement.md``) the mean rose in
every generation while site C's validation Dice fell a little in four of the last seven, and
site C ended 0.04-0.08 below the other sites. A hospital whose scans the federation serves
worst, generation after generation, has little reason to stay in it.

After screening the worker knows what every update does to every validation site (the
influences: the candidate scored with all kept updates and without each one). This step takes the
site the candidate scores lowest, picks the update that raises it most, and builds the
candidate again with that update counted ``factor`` times (as if its node had trained on
``factor`` times its series), for each factor asked for. It keeps the candidate whose lowest
site scores highest, provided its mean validation Dice is at most ``max_mean_cost`` below the
plain candidate's; otherwise the plain candidate stands. The gate then judges the kept
candidate against the current generation as it judges any other.

This is max-min fairness in the spirit of agnostic federated learning (Mohri et al., 2019)
and q-FFL (Li et al., 2020), restricted to what the server can measure: it never learns which
site a hospital serves, only what its update does to each validation site. It costs one
scoring of the validation set per factor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from federation.gate import Scores
from federation.screening import Influence, Screening
from federation.strategies.base import AggregationResult, BufferedUpdate

__all__ = ["Lift", "lift_weakest_site", "weakest_site"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lift:
    """Which update was counted more, for which site, and what it changed."""

    update_id: str
    site: str
    factor: int
    plain: Scores
    lifted: Scores

    def describe(self) -> str:
        """One line for the generation's reason and the log."""
        return (f"update {self.update_id} counted {self.factor}x for the weakest site "
                f"{self.site} (site {self.site} {self.plain.sites[self.site]:.3f} -> "
                f"{self.lifted.sites[self.site]:.3f}, lowest site "
                f"{_lowest(self.plain):.3f} -> {_lowest(self.lifted):.3f}, mean "
                f"{self.plain.mean:.3f} -> {self.lifted.mean:.3f})")


def weakest_site(scores: Scores) -> str | None:
    """The site with the lowest finite Dice (ties: the first by name); None if none scored."""
    finite = sorted((value, site) for site, value in scores.sites.items()
                    if math.isfinite(value))
    return finite[0][1] if finite else None


def _lowest(scores: Scores) -> float:
    site = weakest_site(scores)
    return scores.sites[site] if site is not None else math.nan


def lift_weakest_site(
    screening: Screening,
    *,
    build: Callable[[Sequence[BufferedUpdate]], AggregationResult],
    score: Callable[[Mapping[str, Tensor]], Scores],
    factors: Sequence[int],
    max_mean_cost: float,
) -> tuple[Screening, Lift | None]:
    """Rebuild the screened candidate with the weakest site's best helper counted more.

    Parameters
    ----------
    screening:
        What :func:`federation.screening.screen` returned; its influences name the helper.
    build:
        Builds a candidate from updates (the strategy, bound to the current generation).
    score:
        Scores weights on the validation set.
    factors:
        How many times to count the helper's samples, each tried once (integers >= 2).
    max_mean_cost:
        How far the lifted candidate's mean validation Dice may fall below the plain one's.

    Returns
    -------
    tuple
        The screening with the kept candidate and its scores (the plain one when nothing
        lifts the lowest site within the cost), and the :class:`Lift` made, if any.

    Raises
    ------
    ValueError
        If a factor is below 2 or ``max_mean_cost`` is negative or not finite.
    """
    if any(factor < 2 for factor in factors):
        raise ValueError(f"every factor must be at least 2, not {list(factors)}")
    if not (0 <= max_mean_cost < math.inf):
        raise ValueError(f"max_mean_cost must be >= 0, not {max_mean_cost}")
    site = weakest_site(screening.scores)
    if site is None or not factors or len(screening.kept) < 2 or not screening.influences:
        return screening, None
    # Screening's last pass measured these among the kept updates, without the refused ones
    # (beside a label-flipped update the candidate scores near zero everywhere).
    helper = _best_helper(screening.influences, site)
    if helper is None:
        LOGGER.info("no update raises the weakest site %s: nothing to lift", site)
        return screening, None
    best: tuple[Scores, AggregationResult, int] | None = None
    for factor in factors:
        updates = [dataclasses.replace(u, num_samples=u.num_samples * factor)
                   if u.update_id == helper else u for u in screening.kept]
        candidate = build(updates)
        scores = score(candidate.state)
        LOGGER.info("update %s counted %dx for site %s: lowest site %.4f (plain %.4f), mean "
                    "%.4f (plain %.4f)", helper, factor, site, _lowest(scores),
                    _lowest(screening.scores), scores.mean, screening.scores.mean)
        affordable = scores.mean >= screening.scores.mean - max_mean_cost
        if affordable and _lowest(scores) > _lowest(best[0] if best else screening.scores):
            best = (scores, candidate, factor)
    if best is None:
        LOGGER.info("the plain candidate stands: counting update %s more did not raise the "
                    "lowest site within %.4f of the mean", helper, max_mean_cost)
        return screening, None
    scores, candidate, factor = best
    lift = Lift(update_id=helper, site=site, factor=factor, plain=screening.scores,
                lifted=scores)
    LOGGER.info("%s", lift.describe())
    return dataclasses.replace(screening, candidate=candidate, scores=scores), lift


def _best_helper(influences: Sequence[Influence], site: str) -> str | None:
    """The update whose presence raises ``site`` most, if any raises it at all."""
    gains = ((influence.site_gain(site), influence.update_id) for influence in influences)
    best = max(((gain, update_id) for gain, update_id in gains
                if math.isfinite(gain) and gain > 0), default=None)
    return best[1] if best else None
