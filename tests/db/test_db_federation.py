"""The federation schema and its repository on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.orm import Session

from db import federation as repo
from db.base import utcnow
from db.fed_models import (
    FederationBase,
    FedGeneration,
    FedNode,
    FedUpdate,
    GenerationState,
    UpdateState,
)
from db.migrate import (
    SchemaMismatchError,
    alembic_config,
    check_current,
    current_revision,
    head_revision,
    upgrade,
)
from db.session import make_engine, make_session_factory, session_scope
from tests.postgres import PG_URL, temporary_schema

FED_TABLES = {"fed_nodes", "fed_node_models", "fed_models", "fed_generations", "fed_updates",
              "fed_audit"}
MANIFEST = {"name": "Dafne leg", "architecture": {"id": "unet2d", "params": {}}}
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@contextmanager
def fresh_engine(backend: str, tmp_path: Path) -> Iterator[Engine]:
    """An empty database (an SQLite file, or a new PostgreSQL schema)."""
    if backend == "sqlite":
        engine = make_engine(tmp_path / "shared.db")
        try:
            yield engine
        finally:
            engine.dispose()
        return
    with temporary_schema("test_fed_fresh") as schema:
        engine = make_engine(PG_URL, schema=schema)
        try:
            yield engine
        finally:
            engine.dispose()


def _check_autogenerate(engine: Engine, history: str) -> None:
    """Alembic's own ``check`` through the history's env.py: no difference to its models."""
    config = alembic_config(history)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.check(config)


def _update(session: Session, node_id: int, key: str, *, model: str = "leg",
            state: UpdateState = UpdateState.PENDING, num_samples: int = 4,
            reason: str | None = None, base_generation: int = 1,
            continues_key: str | None = None) -> tuple[FedUpdate, bool]:
    return repo.insert_update_once(
        session, node_id=node_id, model_name=model, idempotency_key=key, state=state,
        base_generation=base_generation if state == UpdateState.PENDING else None,
        continues_key=continues_key, num_samples=num_samples,
        metrics={"dice_before": 0.5, "dice_after": 0.6}, encoding="topk-int8",
        size_bytes=1000, l2_norm=0.25 if state == UpdateState.PENDING else None, clipped=False,
        artifact_key=f"updates/leg/{key}.update" if state == UpdateState.PENDING else None,
        reason=reason, response_status=202 if state == UpdateState.PENDING else 422,
        response={"key": key},
    )


def _seed(session: Session, model: str = "leg") -> FedGeneration:
    """A model with its seed promoted to generation 1."""
    repo.add_model(session, model, MANIFEST, "fedbuff")
    return _generation(session, model, GenerationState.PROMOTED, number=1)


def _generation(session: Session, model: str = "leg",
                state: GenerationState = GenerationState.CANDIDATE,
                number: int | None = None) -> FedGeneration:
    promoted = state == GenerationState.PROMOTED
    return repo.add_generation(
        session, model_name=model, state=state, number=number,
        parent_number=None if number == 1 else 1, strategy="fedbuff",
        weights_key=f"models/{model}/{state}-{number}.safetensors", sha256="ab" * 32,
        size_bytes=123, manifest_key="m.json" if promoted else None,
        signature="c2ln" if promoted else None,
        validation={"mean": 0.8, "sites": {"A": 0.8}} if promoted else None,
        reason="no gain" if state == GenerationState.REJECTED else None)


def _node(session: Session, name: str = "site-a", models: tuple[str, ...] = ("leg",)
          ) -> tuple[FedNode, str]:
    return repo.add_node(session, name, list(models))


def _threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = work(index)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


# --- migrations ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_federation_schema_from_empty_to_head_and_back(backend: str, tmp_path: Path) -> None:
    with fresh_engine(backend, tmp_path) as engine:
        assert current_revision(engine, "federation") is None
        with pytest.raises(SchemaMismatchError,
                           match=r"no federation database at .*: run `dafne-federation init` "
                                 r"or point DAFNE_FED_DB_URL at it"):
            check_current(engine, "federation")
        assert upgrade(engine, history="federation") == head_revision("federation")
        assert upgrade(engine, history="federation") == head_revision("federation")  # no-op
        check_current(engine, "federation")
        tables = set(inspect(engine).get_table_names())
        assert tables == FED_TABLES | {"alembic_version_federation"}
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={
                "compare_type": True, "version_table": "alembic_version_federation"})
            assert compare_metadata(context, FederationBase.metadata) == []
        _check_autogenerate(engine, "federation")

        config = alembic_config("federation")
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version_federation"}
        assert current_revision(engine, "federation") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_and_federation_histories_share_a_database(backend: str, tmp_path: Path) -> None:
    with fresh_engine(backend, tmp_path) as engine:
        upgrade(engine)
        with pytest.raises(SchemaMismatchError, match="no federation database"):
            check_current(engine, "federation")
        upgrade(engine, history="federation")
        assert current_revision(engine, "node") == head_revision("node")
        assert current_revision(engine, "federation") == head_revision("federation")
        check_current(engine)
        check_current(engine, "federation")
        tables = set(inspect(engine).get_table_names())
        assert FED_TABLES | {"jobs", "series", "alembic_version_node",
                             "alembic_version_federation"} <= tables
        # each env.py compares only its own tables: neither proposes to drop the other's
        _check_autogenerate(engine, "node")
        _check_autogenerate(engine, "federation")
        with engine.connect() as connection:
            versions = {
                table: connection.execute(text(f"SELECT version_num FROM {table}")).scalars().all()
                for table in ("alembic_version_node", "alembic_version_federation")}
        assert versions == {"alembic_version_node": [head_revision("node")],
                            "alembic_version_federation": [head_revision("federation")]}
        upgrade(engine)  # the node's restart leaves the federation alone
        assert current_revision(engine, "federation") == head_revision("federation")


def test_federation_mismatch_names_its_own_commands(fed_sqlite_engine: Engine) -> None:
    with fed_sqlite_engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version_federation SET version_num = '0000_old'"))
    with pytest.raises(SchemaMismatchError) as raised:
        check_current(fed_sqlite_engine, "federation")
    assert str(raised.value) == (
        "the federation database is at schema revision 0000_old, this dafne-federation "
        "expects 0002_federation_continues: restart `dafne-federation serve`/`worker` with this "
        "version (they migrate it), or use the dafne-federation of the version that is "
        "running")
    with pytest.raises(SchemaMismatchError, match=r"no node database at .*dafne-node serve"):
        check_current(fed_sqlite_engine)


def test_times_come_back_timezone_aware(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
        node, _ = _node(session)
        update, _ = _update(session, node.id, "k1")
        received = update.received_at
    with session_scope(fed_engine) as session:
        row = repo.get_update(session, update.id)
        assert row is not None
        assert row.received_at.tzinfo is not None
        assert abs(row.received_at - received) < timedelta(milliseconds=1)
        assert row.metrics == {"dice_before": 0.5, "dice_after": 0.6}
        assert row.state is UpdateState.PENDING


# --- nodes and tokens ---------------------------------------------------------------------


def test_tokens_are_random_and_only_their_hash_is_stored(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
        node, token = _node(session)
        _, other = _node(session, "site-b")
        node_id = node.id
    assert token.startswith("dfn_") and len(token) == 4 + 43
    assert token != other
    assert repo.hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
    with session_scope(fed_engine) as session:
        stored = session.get_one(FedNode, node_id)
        assert stored.token_sha256 == repo.hash_token(token)
        dumped = [str(value) for table in FederationBase.metadata.sorted_tables
                  for row in session.execute(select(table)) for value in row]
    assert repo.hash_token(token) in dumped
    assert not [value for value in dumped if token in value or token[4:] in value]


def test_token_lookup_and_revocation(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
        _, token = _node(session)
    with session_scope(fed_engine) as session:
        found = repo.node_for_token(session, token)
        assert found is not None and found.name == "site-a"
        assert repo.node_for_token(session, token + "x") is None
        assert repo.node_for_token(session, "") is None
        first = repo.revoke_node(session, "site-a").revoked_at
        assert first is not None
    with session_scope(fed_engine) as session:
        assert repo.node_for_token(session, token) is None
        assert repo.revoke_node(session, "site-a").revoked_at == first  # revoking again
        assert [node.name for node in repo.list_nodes(session)] == ["site-a"]
        with pytest.raises(repo.FederationRepoError, match="no node named 'site-z'"):
            repo.revoke_node(session, "site-z")
        with pytest.raises(repo.FederationRepoError, match="already a revoked node"):
            _node(session)
        with pytest.raises(repo.FederationRepoError, match="'site-a' is revoked"):
            repo.set_rights(session, "site-a", "leg", can_pull=True, can_push=True)


def test_node_names_models_and_rights(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
        repo.add_model(session, "arm", MANIFEST, "fedbuff")
        node, _ = repo.add_node(session, "site-a", ["leg", "leg"], can_push=False)
        assert [(r.model_name, r.can_pull, r.can_push) for r in node.rights] == [
            ("leg", True, False)]
        for bad in ("", "-a", "a b", "a/b", "x" * 65, "site\n"):
            with pytest.raises(repo.FederationRepoError, match="invalid node name"):
                repo.add_node(session, bad, ["leg"])
        with pytest.raises(repo.FederationRepoError, match="already a node named 'site-a'"):
            repo.add_node(session, "site-a", [])
        with pytest.raises(repo.FederationRepoError, match="no federation model named 'hand'"):
            repo.add_node(session, "site-b", ["leg", "hand"])
        assert [n.name for n in repo.list_nodes(session)] == ["site-a"]
        repo.set_rights(session, "site-a", "leg", can_pull=True, can_push=True)
        repo.set_rights(session, "site-a", "arm", can_pull=True, can_push=False)
        with pytest.raises(repo.FederationRepoError, match="no federation model named 'hand'"):
            repo.set_rights(session, "site-a", "hand", can_pull=True, can_push=True)
        node_id = node.id
    with session_scope(fed_engine) as session:
        rights = repo.node_rights(session, node_id, "leg")
        assert rights is not None and (rights.can_pull, rights.can_push) == (True, True)
        arm = repo.node_rights(session, node_id, "arm")
        assert arm is not None and (arm.can_pull, arm.can_push) == (True, False)
        assert repo.node_rights(session, node_id, "hand") is None
        assert repo.node_rights(session, node_id + 1, "leg") is None


def test_touch_node_never_moves_back(fed_engine: Engine) -> None:
    now = utcnow()
    with session_scope(fed_engine) as session:
        _seed(session)
        node, _ = _node(session)
        assert node.last_seen_at is None
        repo.touch_node(session, node, now)
        repo.touch_node(session, node, now - timedelta(minutes=5))
        node_id = node.id
    with session_scope(fed_engine) as session:
        last = session.get_one(FedNode, node_id).last_seen_at
        assert last is not None and abs(last - now) < timedelta(milliseconds=1)


# --- models and generations ---------------------------------------------------------------


def test_models_are_unique_slugs(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        model = repo.add_model(session, "leg", MANIFEST, "fedbuff")
        assert (model.manifest, model.strategy, model.lease_owner) == (MANIFEST, "fedbuff", None)
        repo.add_model(session, "arm_2", MANIFEST, "dafne")
        for bad in ("Leg", "_leg", "leg.v2", "", "l" * 65):
            with pytest.raises(repo.FederationRepoError, match="invalid model name"):
                repo.add_model(session, bad, MANIFEST, "fedbuff")
        with pytest.raises(repo.FederationRepoError, match="already a federation model"):
            repo.add_model(session, "leg", MANIFEST, "fedbuff")
        with pytest.raises(repo.FederationRepoError, match="needs an aggregation strategy"):
            repo.add_model(session, "hand", MANIFEST, "")
    with session_scope(fed_engine) as session:
        assert [m.name for m in repo.list_models(session)] == ["arm_2", "leg"]
        found = repo.get_model(session, "leg")
        assert found is not None and found.manifest == MANIFEST
        assert repo.get_model(session, "hand") is None


def test_generation_numbers_fit_their_state(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        repo.add_model(session, "leg", MANIFEST, "fedbuff")
        with pytest.raises(repo.FederationRepoError, match="a promoted generation needs"):
            _generation(session, state=GenerationState.PROMOTED, number=None)
        with pytest.raises(repo.FederationRepoError, match="a candidate generation has no"):
            _generation(session, number=3)
        with pytest.raises(repo.FederationRepoError, match="no federation model named 'arm'"):
            _generation(session, "arm")
        seed = _generation(session, state=GenerationState.PROMOTED, number=1)
        assert seed.decided_at is not None
        candidate = _generation(session)
        assert candidate.decided_at is None and candidate.number is None


def test_latest_generation_ignores_candidates_and_rejected(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        assert repo.latest_generation(session, "leg") is None
        _seed(session)
        candidate = _generation(session)
        _generation(session, state=GenerationState.REJECTED)
        latest = repo.latest_generation(session, "leg")
        assert latest is not None and latest.number == 1
        with pytest.raises(repo.FederationRepoError, match="next generation of 'leg' is 2"):
            repo.promote(session, candidate, number=3, manifest_key="g3.json",
                         signature="c2ln", validation={"mean": 0.9})
        repo.promote(session, candidate, number=2, manifest_key="g2.json", signature="c2ln",
                     validation={"mean": 0.9, "sites": {"A": 0.9}}, reason="mean Dice up")
        candidate_id = candidate.id
    with session_scope(fed_engine) as session:
        latest = repo.latest_generation(session, "leg")
        assert latest is not None
        assert (latest.id, latest.number, latest.state, latest.reason, latest.manifest_key) == (
            candidate_id, 2, GenerationState.PROMOTED, "mean Dice up", "g2.json")
        assert latest.decided_at is not None
        second = repo.get_generation(session, "leg", 2)
        assert second is not None and second.id == candidate_id
        assert repo.get_generation(session, "leg", 3) is None
        assert repo.get_generation(session, "arm", 1) is None
        with pytest.raises(repo.FederationRepoError, match="is promoted, not a candidate"):
            repo.reject(session, latest, validation=None, reason="late")


def test_seed_can_be_promoted_from_a_candidate(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        repo.add_model(session, "leg", MANIFEST, "fedbuff")
        seed = _generation(session)
        assert repo.promote(session, seed, number=1, manifest_key="g1.json", signature="c2ln",
                            validation=None, reason="seeded") == 0
    with session_scope(fed_engine) as session:
        latest = repo.latest_generation(session, "leg")
        assert latest is not None and (latest.number, latest.validation) == (1, None)


# --- updates ------------------------------------------------------------------------------


def test_insert_update_once_is_idempotent(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
        node, _ = _node(session)
        other, _ = _node(session, "site-b")
        first, created = _update(session, node.id, "k1", num_samples=4)
        assert created and len(first.id) == 32
        again, created_again = _update(session, node.id, "k1", num_samples=99)
        assert (again.id, created_again, again.num_samples) == (first.id, False, 4)
        theirs, created_theirs = _update(session, other.id, "k1")  # the key is per node
        assert created_theirs and theirs.id != first.id
        chosen, _ = repo.insert_update_once(
            session, node_id=node.id, model_name="leg", idempotency_key="k2",
            state=UpdateState.REFUSED, base_generation=None, num_samples=0, metrics={},
            encoding="", size_bytes=5, l2_norm=None, clipped=False, artifact_key=None,
            reason="malformed update", response_status=422,
            response={"detail": "malformed update"}, update_id="f" * 32)
        assert (chosen.id, chosen.state, chosen.decided_at is not None) == (
            "f" * 32, UpdateState.REFUSED, True)
        with pytest.raises(repo.FederationRepoError, match="pending or refused, not applied"):
            _update(session, node.id, "k3", state=UpdateState.APPLIED)
        node_id, first_id = node.id, first.id
    with session_scope(fed_engine) as session:
        found = repo.find_update(session, node_id, "k1")
        assert found is not None and found.id == first_id and found.response == {"key": "k1"}
        assert repo.find_update(session, node_id, "k9") is None
        assert repo.get_update(session, "0" * 32) is None
        assert session.scalar(select(func.count()).select_from(FedUpdate)) == 3


def test_racing_inserts_with_one_key_make_one_update(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
        node_id = _node(session)[0].id
    sessions = make_session_factory(fed_engine)
    barrier = threading.Barrier(8)

    def insert(index: int) -> tuple[str, bool]:
        barrier.wait(10)
        with sessions() as session, session.begin():
            row, created = _update(session, node_id, "same-key", num_samples=index + 1)
            return row.id, created

    results = _threads(8, insert)
    assert sum(created for _, created in results) == 1
    assert len({update_id for update_id, _ in results}) == 1
    with session_scope(fed_engine) as session:
        assert session.scalar(select(func.count()).select_from(FedUpdate)) == 1


def test_a_request_waiting_on_an_uncommitted_insert_gets_its_row(fed_engine: Engine) -> None:
    """The second request blocks until the first commits, then replays the first's row."""
    with session_scope(fed_engine) as session:
        _seed(session)
        node_id = _node(session)[0].id
    sessions = make_session_factory(fed_engine)
    inserted = threading.Event()
    second: list[tuple[str, bool, int]] = []

    def late() -> None:
        inserted.wait(10)
        with sessions() as session, session.begin():
            row, created = _update(session, node_id, "k1", num_samples=2)
            second.append((row.id, created, row.num_samples))

    thread = threading.Thread(target=late)
    thread.start()
    with sessions() as session, session.begin():
        first, created = _update(session, node_id, "k1", num_samples=1)
        inserted.set()
        time.sleep(0.5)  # the second request waits on the key meanwhile
        first_id = first.id
    thread.join(30)
    assert created
    assert second == [(first_id, False, 1)]


def test_pending_updates_oldest_first_and_summary(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
        repo.add_model(session, "arm", MANIFEST, "fedbuff")
        node_id = _node(session)[0].id
        assert repo.pending_summary(session, "leg") == (0, None)
        ids = [_update(session, node_id, f"k{i}")[0].id for i in range(3)]
        _update(session, node_id, "bad", state=UpdateState.REFUSED, reason="NaN")
        _update(session, node_id, "arm1", model="arm")
    with session_scope(fed_engine) as session:
        assert [u.id for u in repo.pending_updates(session, "leg", 10)] == ids
        assert [u.id for u in repo.pending_updates(session, "leg", 2)] == ids[:2]
        count, oldest = repo.pending_summary(session, "leg")
        first = repo.get_update(session, ids[0])
        assert first is not None
        assert count == 3 and oldest == first.received_at and oldest.tzinfo is not None
        assert repo.pending_summary(session, "arm")[0] == 1
        assert repo.refuse_update(session, ids[2], "unreadable at aggregation")
        assert not repo.refuse_update(session, ids[2], "again")
    with session_scope(fed_engine) as session:
        refused = repo.get_update(session, ids[2])
        assert refused is not None
        assert (refused.state, refused.reason) == (UpdateState.REFUSED,
                                                   "unreadable at aggregation")
        assert refused.response == {"key": "k2"}  # the first answer is kept
        assert repo.pending_summary(session, "leg")[0] == 2


def test_a_node_chain_is_read_and_a_contained_update_superseded(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
        a, b = _node(session, "site-a")[0].id, _node(session, "site-b")[0].id
        first = _update(session, a, "a-r1")[0].id
        later = _update(session, a, "a-r2", continues_key="a-r1")[0].id
        newer = _update(session, a, "a-g2", base_generation=2)[0].id
        other = _update(session, b, "b-r1")[0].id
    with session_scope(fed_engine) as session:
        chain = repo.node_updates(session, "leg", {a}, {1})
        assert [(u.id, u.continues_key) for u in chain] == [(first, None), (later, "a-r1")]
        assert repo.node_updates(session, "leg", {a}, set()) == []
        assert repo.supersede_update(session, first, f"contained in update {later}")
        assert not repo.supersede_update(session, first, "again")
    with session_scope(fed_engine) as session:
        row = repo.get_update(session, first)
        assert row is not None and row.state is UpdateState.SUPERSEDED
        assert row.reason == f"contained in update {later}" and row.decided_at is not None
        assert [u.id for u in repo.pending_updates(session, "leg", 10)] == [later, newer, other]


def test_assign_updates_never_assigns_an_update_twice(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
        repo.add_model(session, "arm", MANIFEST, "fedbuff")
        node_id = _node(session)[0].id
        u1, u2, u3 = (_update(session, node_id, f"k{i}")[0].id for i in range(3))
        refused = _update(session, node_id, "bad", state=UpdateState.REFUSED)[0].id
        arm = _update(session, node_id, "a1", model="arm")[0].id
        first = _generation(session)
        second = _generation(session)
        assert repo.assign_updates(session, [u1, u2], first) == 2
        assert repo.assign_updates(session, [u1, u2, u3, refused, arm], second) == 1
        assert repo.assign_updates(session, [], second) == 0
        assert [u.id for u in repo.pending_updates(session, "leg", 10)] == []
        assert repo.pending_summary(session, "leg") == (0, None)
        assert [u.id for u in first.updates] == sorted([u1, u2])
        assert repo.promote(session, first, number=2, manifest_key="g2.json",
                            signature="c2ln", validation={"mean": 0.9}) == 2
        assert repo.reject(session, second, validation={"mean": 0.1},
                           reason="mean Dice fell by 0.7") == 1
        third = _generation(session)
        assert repo.assign_updates(session, [u1, u2, u3], third) == 0
        with pytest.raises(repo.FederationRepoError, match="is rejected, not a candidate"):
            repo.assign_updates(session, [u1], second)
        first_id, second_id = first.id, second.id
    with session_scope(fed_engine) as session:
        states = {u.id: (u.state, u.generation_id, u.reason, u.decided_at is not None)
                  for u in session.scalars(select(FedUpdate))}
    assert states == {
        u1: (UpdateState.APPLIED, first_id, None, True),
        u2: (UpdateState.APPLIED, first_id, None, True),
        u3: (UpdateState.REJECTED, second_id,
             f"candidate {second_id} was rejected: mean Dice fell by 0.7", True),
        refused: (UpdateState.REFUSED, None, None, True),
        arm: (UpdateState.PENDING, None, None, False),
    }


def test_two_aggregators_assigning_at_once_share_nothing(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
        node_id = _node(session)[0].id
        ids = [_update(session, node_id, f"k{i}")[0].id for i in range(6)]
        candidates = [_generation(session).id for _ in range(4)]
    sessions = make_session_factory(fed_engine)
    barrier = threading.Barrier(len(candidates))

    def assign(index: int) -> int:
        barrier.wait(10)
        with sessions() as session, session.begin():
            candidate = session.get_one(FedGeneration, candidates[index])
            return repo.assign_updates(session, ids, candidate)

    counts = _threads(len(candidates), assign)
    assert sum(counts) == len(ids)
    with session_scope(fed_engine) as session:
        owners = list(session.scalars(select(FedUpdate.generation_id)))
    assert None not in owners
    assert [owners.count(candidate) for candidate in candidates] == counts


def test_list_generations_with_their_updates(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        assert repo.list_generations(session, "leg") == []
        seed = _seed(session)
        node_id = _node(session)[0].id
        ids = [_update(session, node_id, f"k{i}")[0].id for i in range(3)]
        candidate = _generation(session)
        repo.assign_updates(session, list(reversed(ids)), candidate)
        listed = [(g.id, g.number, g.state, members)
                  for g, members in repo.list_generations(session, "leg")]
    assert listed == [(seed.id, 1, GenerationState.PROMOTED, []),
                      (candidate.id, None, GenerationState.CANDIDATE, sorted(ids))]


# --- the aggregation lock -----------------------------------------------------------------


def test_lease_has_one_owner_until_it_expires(fed_engine: Engine) -> None:
    now = utcnow()
    with session_scope(fed_engine) as session:
        _seed(session)
        assert repo.acquire_lease(session, "leg", "worker-a", 60, now)
        assert not repo.acquire_lease(session, "leg", "worker-b", 60, now)
        assert repo.acquire_lease(session, "leg", "worker-a", 60, now + timedelta(seconds=30))
        # renewed to now+90 s: still held at now+80 s
        assert not repo.acquire_lease(session, "leg", "worker-b", 60, now + timedelta(seconds=80))
        assert repo.acquire_lease(session, "leg", "worker-b", 60, now + timedelta(seconds=91))
        assert not repo.acquire_lease(session, "arm", "worker-a", 60, now)  # unknown model
    with session_scope(fed_engine) as session:
        model = repo.get_model(session, "leg")
        assert model is not None and model.lease_owner == "worker-b"
        assert model.lease_until == now + timedelta(seconds=151)
        assert not repo.release_lease(session, "leg", "worker-a")
        assert repo.release_lease(session, "leg", "worker-b")
        assert repo.acquire_lease(session, "leg", "worker-a", 60, now)


def test_racing_aggregators_get_one_lease(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
    sessions = make_session_factory(fed_engine)
    barrier = threading.Barrier(6)
    now = utcnow()

    def acquire(index: int) -> bool:
        barrier.wait(10)
        with sessions() as session, session.begin():
            return repo.acquire_lease(session, "leg", f"worker-{index}", 60, now)

    won = _threads(6, acquire)
    assert sum(won) == 1
    with session_scope(fed_engine) as session:
        model = repo.get_model(session, "leg")
        assert model is not None and model.lease_owner == f"worker-{won.index(True)}"


def test_a_waiting_aggregator_sees_the_lease_just_taken(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        _seed(session)
    sessions = make_session_factory(fed_engine)
    taken = threading.Event()
    second: list[bool] = []
    now = utcnow()

    def late() -> None:
        taken.wait(10)
        with sessions() as session, session.begin():
            second.append(repo.acquire_lease(session, "leg", "worker-b", 60, now))

    thread = threading.Thread(target=late)
    thread.start()
    with sessions() as session, session.begin():
        assert repo.acquire_lease(session, "leg", "worker-a", 60, now)
        taken.set()
        time.sleep(0.5)  # worker-b waits on the row (or the database) meanwhile
    thread.join(30)
    assert second == [False]


# --- audit and status ---------------------------------------------------------------------


def test_audit_newest_first(fed_engine: Engine) -> None:
    with session_scope(fed_engine) as session:
        repo.audit(session, actor="site-a", method="POST", path="/v1/models/leg/updates",
                   status=202, client="10.0.0.1")
        repo.audit(session, actor=None, method="GET", path="/v1/models", status=401,
                   reason="missing bearer token")
        repo.audit(session, actor="admin", method="X" * 40, path="/v1/admin/status",
                   status=200, client="c" * 100)
    with session_scope(fed_engine) as session:
        rows = [(a.actor, a.method, a.path, a.status, a.reason, a.client)
                for a in repo.recent_audit(session)]
        assert [a.status for a in repo.recent_audit(session, limit=2)] == [200, 401]
    assert rows == [
        ("admin", "X" * 16, "/v1/admin/status", 200, None, "c" * 64),
        (None, "GET", "/v1/models", 401, "missing bearer token", None),
        ("site-a", "POST", "/v1/models/leg/updates", 202, None, "10.0.0.1"),
    ]


def test_federation_status(fed_engine: Engine) -> None:
    seen = utcnow()
    with session_scope(fed_engine) as session:
        _seed(session)
        repo.add_model(session, "arm", MANIFEST, "dafne")
        node, _ = _node(session, "site-a", ("leg", "arm"))
        repo.set_rights(session, "site-a", "arm", can_pull=True, can_push=False)
        repo.touch_node(session, node, seen)
        _node(session, "site-b")
        repo.revoke_node(session, "site-b")
        pending = _update(session, node.id, "k1")[0]
        refused = [_update(session, node.id, f"bad{i}", state=UpdateState.REFUSED,
                           reason=f"update L2 norm {i} exceeds the outlier bound")[0]
                   for i in range(22)]
        candidate = _generation(session)
        repo.reject(session, candidate, validation={"mean": 0.2}, reason="mean Dice fell")
        repo.acquire_lease(session, "leg", "worker-a", 60, seen)
        status = repo.federation_status(session)
        seed = repo.latest_generation(session, "leg")
        assert seed is not None
    revoked = status["nodes"][1].pop("revoked_at")
    created = [node_status.pop("created_at") for node_status in status["nodes"]]
    assert revoked is not None and all(created)
    leg = status["models"][1]
    assert status["models"][0] == {
        "name": "arm", "strategy": "dafne", "latest": None, "pending": 0,
        "oldest_pending_at": None, "rejected": [], "refused": [], "lease_owner": None,
        "lease_until": None}
    assert leg["latest"] == {"number": 1, "created_at": seed.created_at.isoformat(),
                             "validation": {"mean": 0.8, "sites": {"A": 0.8}}}
    assert (leg["pending"], leg["oldest_pending_at"]) == (1, pending.received_at.isoformat())
    assert [(r["id"], r["reason"]) for r in leg["rejected"]] == [(candidate.id,
                                                                  "mean Dice fell")]
    assert len(leg["refused"]) == repo.STATUS_LIMIT
    assert leg["refused"][0] == {
        "id": refused[-1].id, "node": "site-a",
        "reason": "update L2 norm 21 exceeds the outlier bound",
        "received_at": refused[-1].received_at.isoformat()}
    assert {r["id"] for r in leg["refused"]} == {u.id for u in refused[2:]}
    assert (leg["lease_owner"], leg["lease_until"]) == (
        "worker-a", (seen + timedelta(seconds=60)).isoformat())
    assert status["nodes"] == [
        {"name": "site-a", "models": {"arm": {"pull": True, "push": False},
                                      "leg": {"pull": True, "push": True}},
         "last_seen_at": seen.isoformat(), "revoked": False, "revoked_at": None},
        {"name": "site-b", "models": {"leg": {"pull": True, "push": True}},
         "last_seen_at": None, "revoked": True},
    ]
