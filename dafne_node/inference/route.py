"""Routing: decide what happens to a complete series.

PACS administrators write rules in the node's TOML file (``[[routes]]``); the
first rule whose every condition matches decides the model and the
destinations. A series that matches no rule is skipped with a reason the
administrator can read in ``dafne-node status``; a SEG is never segmented but
handed to correction handling, because a SEG coming back is a radiologist's
work on one of ours.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.uid import SegmentationStorage

from dafne_node.config import Route


@dataclass(frozen=True)
class SeriesFacts:
    """What routing looks at, taken from the series' first instance and its size."""

    calling_ae: str
    modality: str
    sop_class_uid: str
    body_part: str = ""
    series_description: str = ""
    image_type: tuple[str, ...] = ()
    instance_count: int = 0


@dataclass(frozen=True)
class Segment:
    """Segment the series with ``model`` and send the SEG to ``destinations``."""

    route: str
    model: str
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class Correction:
    """A SEG came in: store it for correction handling, never segment it."""


@dataclass(frozen=True)
class Skip:
    """Nothing to do, and why; recorded so administrators can see it."""

    reason: str


Decision = Segment | Correction | Skip


def route_series(
    facts: SeriesFacts, routes: Sequence[Route], default_destination: str | None
) -> Decision:
    """Apply the first matching rule to ``facts``.

    With no rules configured, MR series are segmented with the default model and
    sent to ``default_destination``: a node started with only ``--dest`` works.
    """
    if facts.sop_class_uid == SegmentationStorage or facts.modality == "SEG":
        return Correction()
    rules = list(routes) or [Route(name="default")]
    reasons: list[str] = []
    for rule in rules:
        mismatch = _first_mismatch(rule, facts)
        if mismatch is None:
            destinations = tuple(rule.destinations) or (
                (default_destination,) if default_destination else ()
            )
            if not destinations:
                return Skip(f"route {rule.name!r} matched but names no destination and "
                            "no default destination is configured")
            return Segment(route=rule.name, model=rule.model, destinations=destinations)
        reasons.append(f"{rule.name}: {mismatch}")
    return Skip("no route matched (" + "; ".join(reasons) + ")")


def _first_mismatch(rule: Route, facts: SeriesFacts) -> str | None:
    """Return why ``rule`` does not apply to ``facts``, or None when it does."""
    checks: list[tuple[bool, str]] = [
        (rule.calling_ae is None or rule.calling_ae == facts.calling_ae,
         f"calling AE {facts.calling_ae!r} is not {rule.calling_ae!r}"),
        (rule.modality is None or rule.modality.upper() == facts.modality.upper(),
         f"modality {facts.modality!r} is not {rule.modality!r}"),
        (rule.body_part is None or rule.body_part.upper() == facts.body_part.upper(),
         f"body part {facts.body_part!r} is not {rule.body_part!r}"),
        (rule.series_description is None
         or re.search(rule.series_description, facts.series_description, re.IGNORECASE)
         is not None,
         f"description {facts.series_description!r} does not match "
         f"/{rule.series_description}/"),
        (rule.image_type is None
         or rule.image_type.upper() in (value.upper() for value in facts.image_type),
         f"image type {'/'.join(facts.image_type)!r} lacks {rule.image_type!r}"),
        (facts.instance_count >= rule.min_slices,
         f"{facts.instance_count} slices, fewer than {rule.min_slices}"),
    ]
    return next((reason for ok, reason in checks if not ok), None)
