"""Aggregation: buffered updates become promoted or rejected generations, exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors

import federation.worker as worker_module
from dafne_node.learning.update import Encoding, decode_update
from dafne_node.model.manifest import ModelManifest
from dafne_node.model.signature import parse_public_key, verify_signature
from db import federation as repo
from db.session import make_engine, make_session_factory
from federation.aggregate import staleness_weight
from federation.app import create_app
from federation.gate import Scores
from federation.signing import load_signing_key
from federation.storage import open_store
from federation.validation import load_validation_set
from federation.worker import Aggregator
from tests.federation.server import BaseModel, FederationSetup, bundled_model, make_update, set_up


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return bundled_model()


def _setup(tmp_path: Path, strategy: str | None = None, *, screen_updates: bool = True,
           step_fractions: tuple[float, ...] = (), lift_weakest_site: tuple[int, ...] = (),
           **aggregation: object) -> FederationSetup:
    sections = {"aggregation": {"buffer_size": 2, "flush_interval_s": 600.0, **aggregation},
                "gate": {"screen_updates": screen_updates,
                         "step_fractions": list(step_fractions),
                         "lift_weakest_site": list(lift_weakest_site)}}
    return set_up(tmp_path, sections=sections, nodes=("hospital-a", "hospital-b", "hospital-c"),
                  strategy=strategy)


def _aggregator(setup: FederationSetup, clock: Clock, owner: str = "w1") -> Aggregator:
    config = setup.config
    return Aggregator(config, make_session_factory(make_engine(config.database_url)),
                      open_store(config.storage_location), load_signing_key(config.key_file),
                      load_validation_set(config.validation_dir), owner=owner, clock=clock)


@pytest.fixture
def setup(tmp_path: Path) -> FederationSetup:
    return _setup(tmp_path)


@pytest.fixture
def client(setup: FederationSetup) -> Iterator[TestClient]:
    with TestClient(create_app(setup.config)) as test_client:
        yield test_client


def _push(client: TestClient, setup: FederationSetup, node: str, body: bytes, key: str) -> str:
    answer = client.post("/v1/models/leg/updates", content=body,
                         headers={"Authorization": f"Bearer {setup.tokens[node]}",
                                  "Idempotency-Key": key})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def _generation_state(client: TestClient, setup: FederationSetup, number: int
                      ) -> dict[str, torch.Tensor]:
    headers = {"Authorization": f"Bearer {setup.tokens['hospital-a']}"}
    return load_safetensors(client.get(f"/v1/models/leg/generations/{number}/weights",
                                       headers=headers).content)


def test_two_updates_make_a_signed_generation_weighted_by_samples(
        setup: FederationSetup, client: TestClient, base: BaseModel) -> None:
    clock = Clock()
    worker = _aggregator(setup, clock)
    bodies = [make_update(base, seed=1, num_samples=3), make_update(base, seed=2, num_samples=1)]
    ids = [_push(client, setup, "hospital-a", bodies[0], "a1")]
    assert worker.tick() == []  # K=2: one update waits
    ids.append(_push(client, setup, "hospital-b", bodies[1], "b1"))
    (outcome,) = worker.tick()
    assert outcome.promoted and outcome.number == 2, outcome.reason
    assert set(outcome.update_ids) == set(ids)

    deltas = [decode_update(body).tensors for body in bodies]
    new = _generation_state(client, setup, 2)
    for name, weight in base.state.items():
        expected = weight + 0.75 * deltas[0][name] + 0.25 * deltas[1][name]
        torch.testing.assert_close(new[name], expected, rtol=0, atol=1e-6)

    headers = {"Authorization": f"Bearer {setup.tokens['hospital-b']}"}
    latest = client.get("/v1/models/leg/generations/latest", headers=headers).json()
    assert latest["number"] == 2 and latest["parent"] == 1
    manifest = client.get(latest["manifest_url"], headers=headers)
    verify_signature(parse_public_key(setup.public_key), manifest.content,
                     manifest.headers["Dafne-Signature"])
    assert ModelManifest.model_validate_json(manifest.content).generation == 2
    for update_id in ids:
        state = client.get(f"/v1/updates/{update_id}",
                           headers={"Authorization": f"Bearer {setup.admin_token}"}).json()
        assert state["state"] == "applied" and state["generation"] == 2
    history = client.get("/v1/models/leg/generations", headers=headers).json()
    assert [(g["number"], g["state"]) for g in history] == [(1, "promoted"), (2, "promoted")]
    assert set(history[1]["updates"]) == set(ids)
    assert history[0]["validation"]["sites"]["A"] > 0.9  # the seed was scored as the baseline


HEAD = "head.weight"


def _wreck(base: BaseModel) -> dict[str, torch.Tensor]:
    """A delta that turns the classifier around (-3x its weights): small norm, big damage."""
    delta = {k: torch.zeros_like(v, dtype=torch.float16) for k, v in base.state.items()}
    delta[HEAD] = (-3 * base.state[HEAD]).to(torch.float16)
    return delta


def test_an_update_that_drags_the_candidate_down_is_refused_and_the_rest_promoted(
        setup: FederationSetup, client: TestClient, base: BaseModel) -> None:
    worker = _aggregator(setup, Clock())
    wreck = _push(client, setup, "hospital-a", make_update(base, _wreck(base)), "wreck")
    fine = _push(client, setup, "hospital-b", make_update(base, seed=3), "fine")

    (outcome,) = worker.tick()

    assert outcome.promoted and outcome.number == 2
    assert outcome.update_ids == (fine,) and outcome.refused == (wreck,)
    admin = {"Authorization": f"Bearer {setup.admin_token}"}
    refused = client.get(f"/v1/updates/{wreck}", headers=admin).json()
    assert refused["state"] == "refused"
    assert refused["reason"].startswith("refused on negative influence: the candidate's mean "
                                        "validation Dice is ")
    history = client.get("/v1/models/leg/generations", headers=admin).json()
    assert history[-1]["updates"] == [fine]
    assert history[-1]["validation"]["mean"] >= history[0]["validation"]["mean"] - 0.01


def test_a_candidate_that_loses_validation_dice_is_rejected_and_kept(
        tmp_path: Path, base: BaseModel) -> None:
    setup = _setup(tmp_path, screen_updates=False)  # so that the wreck stays in
    worker = _aggregator(setup, Clock())
    client = TestClient(create_app(setup.config))
    ids = [_push(client, setup, "hospital-a", make_update(base, _wreck(base)), "wreck"),
           _push(client, setup, "hospital-b", make_update(base, seed=3), "fine")]
    (outcome,) = worker.tick()
    assert not outcome.promoted and outcome.number is None
    assert "Dice" in outcome.reason
    admin = {"Authorization": f"Bearer {setup.admin_token}"}
    latest = client.get("/v1/models/leg/generations/latest", headers=admin).json()
    assert latest["number"] == 1
    history = client.get("/v1/models/leg/generations", headers=admin).json()
    rejected = history[-1]
    assert rejected["state"] == "rejected" and rejected["number"] is None
    assert rejected["reason"] == outcome.reason and set(rejected["updates"]) == set(ids)
    assert rejected["validation"]["mean"] < history[0]["validation"]["mean"]
    for update_id in ids:
        assert client.get(f"/v1/updates/{update_id}", headers=admin).json()["state"] \
            == "rejected"
    status = client.get("/v1/admin/status", headers=admin).json()["models"][0]
    assert status["pending"] == 0 and status["rejected"][0]["reason"] == outcome.reason


def test_a_rejected_step_is_promoted_shorter_and_says_so(tmp_path: Path,
                                                         base: BaseModel) -> None:
    setup = _setup(tmp_path, buffer_size=1, step_fractions=(0.5, 0.1))
    worker = _aggregator(setup, Clock())
    with TestClient(create_app(setup.config)) as client:
        _push(client, setup, "hospital-a", make_update(base, _wreck(base)), "overshoot")
        (outcome,) = worker.tick()
        assert outcome.promoted and outcome.number == 2, outcome.reason
        assert outcome.reason.startswith("at 0.1 of the aggregated step: "), outcome.reason
        assert "(the full step: " in outcome.reason
        new = _generation_state(client, setup, 2)
        admin = {"Authorization": f"Bearer {setup.admin_token}"}
        promoted = client.get("/v1/models/leg/generations", headers=admin).json()[-1]
    # one tenth of the way from the current generation to the full step (head -> -2 head)
    torch.testing.assert_close(new[HEAD], 0.7 * base.state[HEAD], rtol=0, atol=2e-3)
    assert promoted["number"] == 2 and promoted["state"] == "promoted"
    assert promoted["reason"] == outcome.reason
    assert promoted["validation"]["mean"] == pytest.approx(outcome.scores.mean)


def test_dafne_rule_promotes_what_the_relative_gate_rejects(tmp_path: Path,
                                                            base: BaseModel) -> None:
    setup = _setup(tmp_path, strategy="dafne", buffer_size=1)
    worker = _aggregator(setup, Clock())
    with TestClient(create_app(setup.config)) as client:
        _push(client, setup, "hospital-a", make_update(base, _wreck(base)), "wreck")
        (outcome,) = worker.tick()
        # Dafne's threshold rejects nothing, not even a model whose Dice collapsed
        assert outcome.promoted and outcome.number == 2, outcome.reason
        assert outcome.scores.sites["A"] < 0.5
        new = _generation_state(client, setup, 2)
    # Dafne's merge: 0.5 * latest + 0.5 * (base + delta) = -0.5 * head
    torch.testing.assert_close(new[HEAD], -0.5 * base.state[HEAD], rtol=0, atol=2e-3)


def test_a_stale_update_counts_less_and_a_lone_update_is_flushed_in_time(
        setup: FederationSetup, client: TestClient, base: BaseModel) -> None:
    clock = Clock()
    worker = _aggregator(setup, clock)
    _push(client, setup, "hospital-a", make_update(base, seed=4), "a")
    _push(client, setup, "hospital-b", make_update(base, seed=5), "b")
    (first,) = worker.tick()
    assert first.promoted, first.reason
    headers = {"Authorization": f"Bearer {setup.tokens['hospital-c']}"}
    gen2 = client.get("/v1/models/leg/generations/latest", headers=headers).json()
    stale = make_update(base, seed=6, base_generation=1)  # trained before generation 2
    current = make_update(base, seed=7, base_generation=2, base_sha256=gen2["sha256"])
    _push(client, setup, "hospital-c", stale, "stale")
    _push(client, setup, "hospital-a", current, "current")
    (second,) = worker.tick()
    assert second.promoted and second.number == 3, second.reason
    # FedBuff: the stale delta is applied to generation 2 with weight 1/sqrt(1 + 2 - 1)
    s = staleness_weight(2, 1)
    assert s == pytest.approx(2 ** -0.5)
    before, after = _generation_state(client, setup, 2), _generation_state(client, setup, 3)
    d_stale, d_current = decode_update(stale).tensors, decode_update(current).tensors
    for name in before:
        expected = before[name] + (s * d_stale[name] + d_current[name]) / (s + 1)
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)

    gen3 = client.get("/v1/models/leg/generations/latest", headers=headers).json()
    clock.now = datetime.now(UTC)
    _push(client, setup, "hospital-b", make_update(base, seed=8, base_generation=3,
                                                   base_sha256=gen3["sha256"]), "lone")
    assert worker.tick() == []  # K=2: it waits ...
    clock.now += timedelta(seconds=601)
    (flushed,) = worker.tick()  # ... until the flush interval has passed
    assert flushed.promoted and len(flushed.update_ids) == 1, flushed.reason


def _noise(base: BaseModel, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 1e-3 for k, v in base.state.items()}


def _sum(*deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: sum(d[k] for d in deltas).to(torch.float16) for k in deltas[0]}


def test_a_cumulative_update_supersedes_the_waiting_one_it_contains(
        tmp_path: Path, base: BaseModel) -> None:
    setup = _setup(tmp_path, buffer_size=3)
    worker = _aggregator(setup, Clock())
    first, more = _noise(base, 11), _noise(base, 12)
    with TestClient(create_app(setup.config)) as client:
        earlier = _push(client, setup, "hospital-a", make_update(base, _sum(first)), "a-r1")
        later_body = make_update(base, _sum(first, more), num_samples=3, continues="a-r1")
        later = _push(client, setup, "hospital-a", later_body, "a-r2")
        other_body = make_update(base, seed=13, num_samples=1)
        other = _push(client, setup, "hospital-b", other_body, "b-r1")

        (outcome,) = worker.tick()

        assert outcome.promoted, outcome.reason
        assert set(outcome.update_ids) == {later, other}  # hospital A's round 1 counts once
        assert outcome.superseded == (earlier,)
        admin = {"Authorization": f"Bearer {setup.admin_token}"}
        state = client.get(f"/v1/updates/{earlier}", headers=admin).json()
        assert state["state"] == "superseded" and later in state["reason"]
        new = _generation_state(client, setup, 2)
    d_later, d_other = decode_update(later_body).tensors, decode_update(other_body).tensors
    for name, weight in base.state.items():
        expected = weight + 0.75 * d_later[name] + 0.25 * d_other[name]
        torch.testing.assert_close(new[name], expected, rtol=0, atol=1e-6)


def test_an_update_that_continues_an_applied_one_adds_only_what_is_new(
        tmp_path: Path, base: BaseModel) -> None:
    setup = _setup(tmp_path, buffer_size=1)
    worker = _aggregator(setup, Clock())
    first = _noise(base, 21)
    more = {k: v if k == HEAD else torch.zeros_like(v) for k, v in _noise(base, 22).items()}
    first_body = make_update(base, _sum(first))
    cumulative_body = make_update(base, _sum(first, more), continues="a-r1")
    with TestClient(create_app(setup.config)) as client:
        _push(client, setup, "hospital-a", first_body, "a-r1")
        (applied,) = worker.tick()
        assert applied.promoted and applied.number == 2, applied.reason
        # generation 2 has not been pulled: round 2 trained on from round 1, against 1
        _push(client, setup, "hospital-a", cumulative_body, "a-r2")
        (outcome,) = worker.tick()
        assert outcome.promoted and outcome.number == 3, outcome.reason
        gen2, gen3 = _generation_state(client, setup, 2), _generation_state(client, setup, 3)
    d_first, d_cumulative = (decode_update(first_body).tensors,
                             decode_update(cumulative_body).tensors)
    for name in gen2:  # a lone update has weight 1, whatever its staleness
        expected = gen2[name] + (d_cumulative[name] - d_first[name])
        torch.testing.assert_close(gen3[name], expected, rtol=0, atol=1e-6)
        if name != HEAD:  # round 2 learnt only the head: round 1 is not applied again
            torch.testing.assert_close(gen3[name], gen2[name], rtol=0, atol=1e-6)
    assert not torch.equal(gen3[HEAD], gen2[HEAD])


def test_only_one_worker_aggregates_a_model_at_a_time(setup: FederationSetup,
                                                      client: TestClient,
                                                      base: BaseModel) -> None:
    clock = Clock()
    first, second = _aggregator(setup, clock, "w1"), _aggregator(setup, clock, "w2")
    _push(client, setup, "hospital-a", make_update(base, seed=8), "a")
    _push(client, setup, "hospital-b", make_update(base, seed=9), "b")
    sessions = make_session_factory(make_engine(setup.config.database_url))
    with sessions() as session, session.begin():
        assert repo.acquire_lease(session, "leg", "w1", 900, clock())
    assert second.tick() == []  # w1 holds the lease
    clock.now += timedelta(seconds=901)  # w1 died: its lease runs out
    (outcome,) = second.tick()
    assert outcome.promoted
    assert first.tick() == []  # nothing left, nothing applied twice


def test_a_worker_that_loses_its_lease_while_screening_drops_its_candidate(
        setup: FederationSetup, client: TestClient, base: BaseModel,
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    first, second = _aggregator(setup, clock, "w1"), _aggregator(setup, clock, "w2")
    ids = [_push(client, setup, "hospital-a", make_update(base, seed=8), "a"),
           _push(client, setup, "hospital-b", make_update(base, seed=9), "b")]
    sessions = make_session_factory(make_engine(setup.config.database_url))
    scored = []
    real_score_state = worker_module.score_state

    def slow_scoring(*args: object, **kwargs: object) -> Scores:
        scored.append(1)
        if len(scored) == 3:  # w1 stalled past its lease; w2 took the model over
            clock.now += timedelta(seconds=901)
            with sessions() as session, session.begin():
                assert repo.acquire_lease(session, "leg", "w2", 900, clock())
        return real_score_state(*args, **kwargs)

    monkeypatch.setattr(worker_module, "score_state", slow_scoring)
    with pytest.raises(RuntimeError, match="lost the aggregation lease of 'leg'"):
        first.tick()
    monkeypatch.setattr(worker_module, "score_state", real_score_state)
    admin = {"Authorization": f"Bearer {setup.admin_token}"}
    assert all(client.get(f"/v1/updates/{i}", headers=admin).json()["state"] == "pending"
               for i in ids)
    (outcome,) = second.tick()
    assert outcome.promoted and set(outcome.update_ids) == set(ids)


def _head_shift(base: BaseModel, shift: float) -> dict[str, torch.Tensor]:
    """A delta that moves every weight of the classifier by ``shift`` and nothing else."""
    delta = {k: torch.zeros_like(v, dtype=torch.float16) for k, v in base.state.items()}
    delta[HEAD] = torch.full_like(base.state[HEAD], shift, dtype=torch.float16)
    return delta


def test_the_update_that_helps_the_weakest_site_counts_more_and_the_generation_says_so(
        tmp_path: Path, base: BaseModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # A validation set whose Dice is known from the classifier's mean shift x: site A is
    # best at x = 0.01, site C at x = -0.01. Two site-A hospitals push towards A, one
    # site-C hospital towards C; the plain candidate leaves site C lowest.
    setup = _setup(tmp_path, lift_weakest_site=(2, 3), buffer_size=3)
    origin = float(base.state[HEAD].mean())

    def toy_scores(seed: object, weights: dict[str, torch.Tensor], *args: object,
                   **kwargs: object) -> Scores:
        x = (float(weights[HEAD].float().mean()) - origin) * 100
        a, c = 1 - abs(x - 1) / 3, 1 - abs(x + 1) / 2
        return Scores(mean=(a + c) / 2, sites={"A": a, "C": c})

    monkeypatch.setattr(worker_module, "score_state", toy_scores)
    with TestClient(create_app(setup.config)) as client:
        ids = [_push(client, setup, node, make_update(base, _head_shift(base, shift),
                                                      encoding=Encoding.FP16), node)
               for node, shift in (("hospital-a", 0.01), ("hospital-b", 0.01),
                                   ("hospital-c", -0.006))]
        (outcome,) = _aggregator(setup, Clock()).tick()
        assert outcome.promoted and set(outcome.update_ids) == set(ids)
        assert f"update {ids[2]} counted 3x for the weakest site C (site C 0.267 -> " \
            in outcome.reason
        admin = {"Authorization": f"Bearer {setup.admin_token}"}
        history = client.get("/v1/models/leg/generations", headers=admin).json()
        assert "counted 3x for the weakest site C" in history[-1]["reason"]
        new = _generation_state(client, setup, 2)
    # FedBuff at server lr 1: site C's update counts 3 of 5 shares.
    shift = float((new[HEAD].float() - base.state[HEAD].float()).mean())
    assert shift == pytest.approx((2 * 0.01 - 3 * 0.006) / 5, abs=1e-5)
    assert history[-1]["validation"]["sites"]["C"] > 0.267
