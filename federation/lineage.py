"""Cumulative updates: which waiting update another one contains, and what is new in it.

A node that keeps training its own local model between two generations (its last update
went into a candidate that is still waiting, or was rejected, or the new generation has not
been pulled yet) uploads deltas against the same base generation that grow: round 2's delta
is round 1's plus what round 2 learnt. The node says so: its update names the idempotency
key of the earlier upload it ``continues`` (:class:`dafne_node.learning.update.UpdateMetadata`).
FedBuff adds deltas, so taken as they come that node's round 1 would count twice, once in
each update. Here, per node and base generation, the chain of ``continues`` links decides:

* a waiting update that a later one contains, where that later one is waiting too or was
  applied, is **superseded**: never aggregated on its own, since its content arrives (or
  arrived) with the later one;
* a waiting update whose chain reaches an **applied** update carries only the difference:
  the worker aggregates its delta minus the applied one's, which is what the node learnt
  since (and, as a bonus, what the top-k encoding of the applied one left out).

Updates of rejected candidates, refused ones and superseded ones were never applied, so the
chain is followed through them. The rules are pure functions of the updates' records; the
worker (:mod:`federation.worker`) reads the records and applies the answer. Dafne's rule
merges whole models, for which a newer model replacing an older one is the rule itself, and
keeps its own behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from db.fed_models import UpdateState

__all__ = ["Lineage", "UpdateRecord", "resolve_lineage"]


@dataclass(frozen=True)
class UpdateRecord:
    """What the chain rules need to know of one update (a ``fed_updates`` row)."""

    update_id: str
    node_id: int
    idempotency_key: str
    continues_key: str | None
    base_generation: int | None
    state: UpdateState


@dataclass(frozen=True)
class Lineage:
    """What to do with a buffer of waiting updates.

    Attributes
    ----------
    superseded:
        Waiting update id -> id of the later update of the same node that contains it.
    subtract:
        Waiting update id -> id of the applied update whose delta is to be subtracted from
        it (the nearest applied one on its chain).
    """

    superseded: dict[str, str]
    subtract: dict[str, str]


def _ancestors(record: UpdateRecord, by_key: dict[tuple[int, str], UpdateRecord]
               ) -> list[UpdateRecord]:
    """The updates ``record`` contains, nearest first (same node and base generation).

    A link to an unknown key, to another base generation or back into the chain ends it:
    only what the node's own records say for certain is followed.
    """
    chain: list[UpdateRecord] = []
    seen = {record.update_id}
    key = record.continues_key
    while key is not None:
        earlier = by_key.get((record.node_id, key))
        if (earlier is None or earlier.update_id in seen
                or earlier.base_generation != record.base_generation):
            break
        chain.append(earlier)
        seen.add(earlier.update_id)
        key = earlier.continues_key
    return chain


def resolve_lineage(waiting: Sequence[str], records: Iterable[UpdateRecord]) -> Lineage:
    """Which of the ``waiting`` updates are superseded, and which carry only a difference.

    Parameters
    ----------
    waiting:
        Ids of the updates about to be aggregated (pending, in no candidate).
    records:
        Every update of the same nodes and model that may be on their chains (at least
        those against the waiting updates' base generations), waiting ones included.
    """
    records = list(records)
    by_key = {(r.node_id, r.idempotency_key): r for r in records}
    by_id = {r.update_id: r for r in records}
    in_buffer = set(waiting)
    superseded: dict[str, str] = {}
    # Newest containers first (waiting order is oldest first; applied ones are older
    # still), so a superseded update names the latest update that contains it.
    containers = [by_id[i] for i in reversed(waiting) if i in by_id]
    containers += [r for r in records if r.state == UpdateState.APPLIED]
    for container in containers:
        for earlier in _ancestors(container, by_key):
            if earlier.update_id in in_buffer:
                superseded.setdefault(earlier.update_id, container.update_id)
    subtract: dict[str, str] = {}
    for update_id in waiting:
        record = by_id.get(update_id)
        if record is None or update_id in superseded:
            continue
        applied = next((a for a in _ancestors(record, by_key)
                        if a.state == UpdateState.APPLIED), None)
        if applied is not None:
            subtract[update_id] = applied.update_id
    return Lineage(superseded=superseded, subtract=subtract)
