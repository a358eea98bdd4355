"""Reject on negative influence: an update that makes the candidate worse is left out of it.

Norm limits stop updates that are large. They do not stop a hospital whose corrections are
consistently wrong (muscles labelled by another convention, a broken export, an attacker),
because its node trains honestly on them and uploads a delta of ordinary size. Averaged
with good updates it only dulls the candidate, which may still pass the gate, and
generation after generation the model learns the wrong labels at that hospital's share.

Screening measures each update's influence on the candidate: the candidate is built with
every update and again without each one in turn (leave one out), and all are scored on the
validation set. An update is refused, with the measured influence as its reason, when its
presence lowers the candidate's mean validation Dice by more than ``max_influence_drop``
and raises no site's Dice by as much as it lowers the mean: it helps nobody. (A site that
scores near zero moves by a few hundredths either way; that is no help.) The candidate is then built
from the rest. This is *Reject On Negative Influence* (Nelson et al., "Exploiting machine
learning to subvert your spam filter", 2008; Barreno et al., "The security of machine
learning", 2010) applied to a buffer of updates, with one change the multi-hospital run
showed to be needed: the honest update of a hospital whose protocol the model does not yet
handle (site C's water images against a model that knows T1) raises its own site a lot and
costs the others a little at first, so by the mean alone it measures harmful; refusing it
would keep that hospital out of the federation for good.

Screening repeats on the updates it kept until a pass refuses nothing. Beside a wrecking
update the candidate scores near zero everywhere, and every other update measures against
that wreck: a harmful one can then look helpful (in the multi-hospital run, a two
generations stale update that the clean buffer refused raised the mean from 0.233 to 0.261
beside a label-flipped one, and so was kept). Measured again among the kept updates, it is
refused as in the clean buffer: replayed with repeated passes, that generation's weights
were the clean run's, bit for bit.

Screening picks out the few that disagree with the rest; it does not judge the whole
buffer. It never refuses more than half of the buffer: a pass whose harmful updates would
take the refused past half refuses none of them, and the gate decides (this includes a
buffer where every update measures harmful). Without that bound, repeated passes on a small,
noisy validation set peeled honest updates off one by one: in the suite's small
multi-hospital run, three of four.

A pass costs one scoring of the validation set per update, plus one. A single update is not
screened: its influence is exactly what the gate measures. A small negative influence within
the allowance is kept, since on a small validation set a good update can measure slightly
negative.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from federation.gate import Scores
from federation.strategies.base import AggregationResult, BufferedUpdate

__all__ = ["Influence", "Screening", "leave_one_out", "screen"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Influence:
    """The candidate's validation scores with every update and without one of them."""

    update_id: str
    with_update: Scores
    without_update: Scores

    @property
    def change(self) -> float:
        """Mean Dice with the update minus without it (NaN if either is NaN)."""
        return self.with_update.mean - self.without_update.mean

    def site_gain(self, site: str) -> float:
        """Site ``site``'s Dice with the update minus without it (NaN if either is missing)."""
        return (self.with_update.sites.get(site, math.nan)
                - self.without_update.sites.get(site, math.nan))

    @property
    def best_site_gain(self) -> float:
        """The largest rise of a site's Dice that the update brings (NaN if none scored)."""
        finite = [g for g in map(self.site_gain, self.with_update.sites) if math.isfinite(g)]
        return max(finite) if finite else math.nan

    def helps_nobody(self, allowance: float) -> bool:
        """Lowers the mean by more than ``allowance``, and no site gains as much as that."""
        return self.change < -allowance and not self.best_site_gain > -self.change


@dataclass(frozen=True)
class Screening:
    """The candidate built from the updates that passed, its scores, and who was refused."""

    kept: list[BufferedUpdate]
    candidate: AggregationResult
    scores: Scores
    refused: dict[str, str] = field(default_factory=dict)
    """Refused update id -> the reason recorded for it."""
    influences: list[Influence] = field(default_factory=list)
    """The last pass's influences: each kept update's, measured among the kept ones (empty
    when fewer than two were kept, or screening is off)."""


def leave_one_out(
    updates: Sequence[BufferedUpdate],
    scores: Scores,
    *,
    build: Callable[[Sequence[BufferedUpdate]], AggregationResult],
    score: Callable[[Mapping[str, Tensor]], Scores],
) -> list[Influence]:
    """Each update's influence on the candidate of all ``updates`` (scored ``scores``).

    The candidate is built again without each update in turn: one scoring per update.
    """
    influences = []
    for update in updates:
        without = score(build([u for u in updates if u is not update]).state)
        influence = Influence(update.update_id, scores, without)
        influences.append(influence)
        LOGGER.info("update %s: candidate mean Dice %.4f with it, %.4f without it; best site "
                    "gain %+.4f", update.update_id, scores.mean, without.mean,
                    influence.best_site_gain)
    return influences


def screen(
    updates: Sequence[BufferedUpdate],
    *,
    build: Callable[[Sequence[BufferedUpdate]], AggregationResult],
    score: Callable[[Mapping[str, Tensor]], Scores],
    max_influence_drop: float | None,
) -> Screening:
    """Leave out the updates whose presence lowers the candidate's validation Dice.

    Passes repeat on the kept updates until one refuses nothing (see the module's text).

    Parameters
    ----------
    updates:
        The buffer, in the order the strategy takes it.
    build:
        Builds the candidate from some of the updates (the strategy, bound to the current
        generation).
    score:
        Scores weights on the validation set.
    max_influence_drop:
        Largest drop of mean validation Dice an update may cause and still be kept;
        ``None``: screening is off, and the candidate of all updates is built and scored.
    """
    if max_influence_drop is not None and not (0 <= max_influence_drop < math.inf):
        raise ValueError(f"max_influence_drop must be >= 0, not {max_influence_drop}")
    kept = list(updates)
    candidate = build(kept)
    scores = score(candidate.state)
    if max_influence_drop is None:
        return Screening(kept=kept, candidate=candidate, scores=scores)
    refused: dict[str, str] = {}
    influences: list[Influence] = []
    while len(kept) >= 2:
        influences = leave_one_out(kept, scores, build=build, score=score)
        harmful = {i.update_id: i for i in influences if i.helps_nobody(max_influence_drop)}
        if not harmful:
            break
        if 2 * (len(refused) + len(harmful)) > len(updates):
            LOGGER.warning("%d more of the buffer's %d updates lower the candidate, which would "
                           "refuse more than half of it; none of them is refused and the gate "
                           "decides", len(harmful), len(updates))
            break
        for update_id, i in harmful.items():
            refused[update_id] = (
                f"refused on negative influence: the candidate's mean validation Dice is "
                f"{i.with_update.mean:.4f} with this update and {i.without_update.mean:.4f} "
                f"without it, and no site gains as much with it")
            LOGGER.warning("update %s %s", update_id, refused[update_id])
        kept = [u for u in kept if u.update_id not in harmful]
        candidate = build(kept)
        scores = score(candidate.state)
        influences = []
    return Screening(kept=kept, candidate=candidate, scores=scores, refused=refused,
                     influences=influences)
