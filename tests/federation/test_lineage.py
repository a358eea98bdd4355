"""Cumulative updates: which waiting update a later one contains, and what to subtract."""

from __future__ import annotations

from db.fed_models import UpdateState
from federation.lineage import UpdateRecord, resolve_lineage

PENDING, APPLIED, REJECTED = UpdateState.PENDING, UpdateState.APPLIED, UpdateState.REJECTED


def record(update_id: str, *, continues: str | None = None, node: int = 1, base: int = 1,
           state: UpdateState = PENDING) -> UpdateRecord:
    """Update ``update_id`` whose idempotency key is ``key-<update_id>``."""
    return UpdateRecord(update_id=update_id, node_id=node, idempotency_key=f"key-{update_id}",
                        continues_key=f"key-{continues}" if continues else None,
                        base_generation=base, state=state)


def test_a_waiting_chain_keeps_only_its_newest_update() -> None:
    records = [record("r1"), record("r2", continues="r1"), record("r3", continues="r2"),
               record("b1", node=2)]
    lineage = resolve_lineage(["r1", "r2", "b1", "r3"], records)
    assert lineage.superseded == {"r1": "r3", "r2": "r3"}
    assert lineage.subtract == {}


def test_the_nearest_applied_update_is_subtracted_through_rejected_ones() -> None:
    records = [record("r1", state=APPLIED), record("r2", continues="r1", state=REJECTED),
               record("r3", continues="r2")]
    lineage = resolve_lineage(["r3"], records)
    assert lineage.superseded == {}
    assert lineage.subtract == {"r3": "r1"}


def test_an_update_that_arrives_after_the_applied_one_containing_it_is_superseded() -> None:
    records = [record("r2", continues="r1", state=APPLIED), record("r1")]
    assert resolve_lineage(["r1"], records).superseded == {"r1": "r2"}


def test_an_update_of_its_own_is_left_as_it_is() -> None:
    """No link (a run that started from the generation again), or a rejected container."""
    records = [record("r1", state=APPLIED), record("r2"),
               record("r3", state=REJECTED), record("r4", continues="r3", state=REJECTED),
               record("r5")]
    lineage = resolve_lineage(["r2", "r5"], records)
    assert lineage.superseded == {} and lineage.subtract == {}


def test_links_never_cross_nodes_or_generations_and_loops_end() -> None:
    records = [
        record("a1", node=1, state=APPLIED),
        record("b1", node=2, continues="a1"),         # another node's key: not its chain
        record("c1", base=1, state=APPLIED),
        record("c2", base=2, continues="c1"),         # against another generation
        record("x1", continues="x2"), record("x2", continues="x1", state=REJECTED),
    ]
    lineage = resolve_lineage(["b1", "c2", "x1"], records)
    assert lineage.superseded == {} and lineage.subtract == {}
