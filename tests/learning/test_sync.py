"""The federation sync client against a played server (``httpx.MockTransport``).

The server's answers are those the federation API documents; what is checked is what the
node sends (exactly the encoded update, under one idempotency key, however often it is
retried), what it records, and that a generation is installed only when it verifies,
before anything of it is loaded.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import dafne_node.learning.sync as sync_module
from dafne_node.api import create_app
from dafne_node.app.cli import main
from dafne_node.app.node import Node as NodeProcess
from dafne_node.config import NodeConfig, load_config
from dafne_node.inference.model import ActiveModel
from dafne_node.learning.delta import DeltaMetadata, load_delta, read_delta_metadata, save_delta
from dafne_node.learning.sync import RESIDUAL_FILE, SIGNATURE_FILE, SyncClient
from dafne_node.learning.training import run_now
from dafne_node.learning.update import EncodedUpdate, Encoding, decode_update, encode_update
from dafne_node.model.manifest import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    default_model_dir,
    load_manifest,
    load_model_dir,
    save_model_dir,
)
from dafne_node.model.signature import public_key_text
from dafne_node.model_registry import active_model, register_active_model
from dafne_node.status import collect_status, format_status
from db.base import utcnow
from db.federation_sync import enqueue_upload, sync_state
from db.migrate import upgrade
from db.node_models import FederationSync, FederationUpload, Model, UploadState
from db.session import make_engine, make_session_factory
from tests.node.conftest import Node

URL = "https://federation.test"
TOKEN = "dfn_node_token"
T0 = datetime(2026, 12, 11, 9, 0, tzinfo=UTC)
ALLOWED_UPLOAD_HEADERS = {"host", "accept", "accept-encoding", "connection", "user-agent",
                          "content-length", "authorization", "idempotency-key", "content-type"}


class Clock:
    """A clock the test sets."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class Generation:
    """A root generation as the server publishes it: signed manifest bytes and weights."""

    manifest: bytes
    signature: str
    weights: bytes


@pytest.fixture(scope="module")
def server_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def generation_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generation 2: the bundled model with one weight moved a little."""
    loaded = load_model_dir(default_model_dir())
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1e-3)
    target = tmp_path_factory.mktemp("federation") / "g2"
    save_model_dir(loaded.model, target, name=loaded.manifest.name, generation=2,
                   preprocessing=loaded.preprocessing, labels=loaded.manifest.to_labels(),
                   training={"kind": "federated aggregation"})
    return target


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data)).decode("ascii")


@pytest.fixture
def generation(generation_dir: Path, server_key: Ed25519PrivateKey) -> Generation:
    manifest = (generation_dir / MANIFEST_FILE).read_bytes()
    return Generation(manifest, sign(server_key, manifest),
                      (generation_dir / WEIGHTS_FILE).read_bytes())


def node_config(folder: Path, public_key: str, **federation: object) -> NodeConfig:
    settings = {"url": URL, "token": TOKEN, "public_key": public_key,
                "retry_initial_s": 5, "retry_max_s": 12, **federation}
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    toml = folder / "node.toml"
    toml.write_text(f"[federation]\n{lines}")
    return load_config(toml, environ={}, overrides={("node", "data_dir"): folder / "data"})


@pytest.fixture
def config(tmp_path: Path, server_key: Ed25519PrivateKey) -> NodeConfig:
    return node_config(tmp_path, public_key_text(server_key.public_key()))


@pytest.fixture
def sessions(config: NodeConfig) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(config.database_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def models(config: NodeConfig, sessions: sessionmaker[Session]) -> ActiveModel:
    """The node's model as a node process has it: the bundled generation 1, registered."""
    return ActiveModel(sessions, config, check_every_s=0)


@dataclass
class FakeServer:
    """The federation API's documented answers, with every request kept."""

    generation: Generation | None = None
    number: int = 2
    weights_status: int = 200
    uploads: list[Callable[[httpx.Request], httpx.Response]] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def paths(self) -> list[str]:
        return [f"{request.method} {request.url.path}" for request in self.requests]

    def posted(self) -> list[httpx.Request]:
        return [request for request in self.requests if request.method == "POST"]

    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        path = request.url.path
        if request.method == "POST" and path == "/v1/models/leg/updates":
            return self.uploads.pop(0)(request)
        prefix = f"/v1/models/leg/generations/{self.number}"
        generation = self.generation
        if path == "/v1/models/leg/generations/latest" and generation is not None:
            etag = f'"leg-{self.number}"'
            if request.headers.get("if-none-match") == etag:
                return httpx.Response(304, headers={"ETag": etag})
            return httpx.Response(200, headers={"ETag": etag}, json={
                "model": "leg", "number": self.number, "sha256": "0" * 64,
                "signature": generation.signature, "size_bytes": len(generation.weights),
                "created_at": T0.isoformat(), "parent": self.number - 1, "validation": None,
                "manifest_url": f"{prefix}/manifest", "weights_url": f"{prefix}/weights"})
        if path == f"{prefix}/manifest" and generation is not None:
            return httpx.Response(200, content=generation.manifest, headers={
                "Content-Type": "application/json", "Dafne-Signature": generation.signature})
        if path == f"{prefix}/weights" and generation is not None:
            if self.weights_status != 200:
                return httpx.Response(self.weights_status, json={"detail": "storage down"})
            return httpx.Response(200, content=generation.weights)
        return httpx.Response(404, json={"detail": f"no such thing: {path}"})


def accepted(update_id: str = "a" * 32) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _request: httpx.Response(202, json={
        "id": update_id, "model": "leg", "state": "pending", "base_generation": 1,
        "num_samples": 3, "l2_norm": 0.1, "clipped": False, "received_at": T0.isoformat(),
        "reason": None, "generation": None})


def answer(status: int, detail: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _request: httpx.Response(status, json={"detail": detail, "update_id": None})


def unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def client(config: NodeConfig, sessions: sessionmaker[Session], server: FakeServer,
           clock: Clock | None = None) -> SyncClient:
    return SyncClient(config, sessions, transport=server.transport(), clock=clock or Clock(),
                      owner="test-node")


def queue_delta(config: NodeConfig, sessions: sessionmaker[Session], *,
                local_round: int = 1, now: datetime = T0, base_generation: int = 1,
                continues_round: int | None = None) -> FederationUpload:
    """A delta file of an accepted run against generation ``base_generation``, queued.

    ``continues_round``: the run fine-tuned that local round's model (a cumulative delta).
    """
    root = load_model_dir(default_model_dir())
    generator = torch.Generator().manual_seed(local_round)
    tensors = {name: (torch.randn(value.shape, generator=generator) * 1e-3).half()
               for name, value in root.model.state_dict().items()}
    metadata = DeltaMetadata(
        model_name=root.manifest.name, architecture=root.manifest.architecture.id,
        base_generation=base_generation, base_sha256=root.manifest.weights.sha256,
        local_round=local_round, continues_round=continues_round, num_samples=3,
        num_slices=36, metrics={"heldout_dice_after": 0.91})
    path = (config.node.data_dir / "models"
            / f"dafne-leg-g{base_generation}-local{local_round}" / "delta.safetensors")
    save_delta(path, tensors, metadata)
    with sessions() as session, session.begin():
        return enqueue_upload(session, delta_path=path, base_generation=base_generation,
                              local_round=local_round, now=now)


def upload_row(sessions: sessionmaker[Session], upload_id: int) -> FederationUpload:
    with sessions() as session:
        row = session.get(FederationUpload, upload_id)
        assert row is not None
        return row


# -- uploads ------------------------------------------------------------------------------


def test_an_accepted_upload_records_the_server_id_and_sends_only_the_encoded_update(
    config: NodeConfig, sessions: sessionmaker[Session],
) -> None:
    queued = queue_delta(config, sessions)
    server = FakeServer(uploads=[accepted("f" * 32)])
    assert client(config, sessions, server).upload_due() == 1

    row = upload_row(sessions, queued.id)
    assert (row.state, row.server_update_id, row.server_state) == (UploadState.SENT, "f" * 32,
                                                                   "pending")
    assert (row.attempts, row.sent_at, row.last_error) == (1, T0, None)
    [request] = server.posted()
    assert request.url == f"{URL}/v1/models/leg/updates"
    assert request.headers["idempotency-key"] == queued.idempotency_key
    assert request.headers["content-type"] == "application/octet-stream"
    assert set(request.headers) <= ALLOWED_UPLOAD_HEADERS
    assert not any("delta" in value or "dafne-leg" in value or str(config.node.data_dir) in value
                   for value in request.headers.values()), "no file name in a header"
    assert row.payload_path is not None
    assert request.content == Path(row.payload_path).read_bytes()
    update = decode_update(request.content)
    assert update.metadata.base_generation == 1
    assert update.metadata.num_samples == 3
    assert update.metadata.metrics == {"heldout_dice_after": 0.91}
    big = [info for info in update.metadata.tensors.values() if info.numel >= 4096]
    assert big and {info.encoding for info in big} == {Encoding.TOPK_INT8}
    assert (config.node.data_dir / "federation" / RESIDUAL_FILE).is_file()
    assert client(config, sessions, server).upload_due() == 0, "sent once"


def test_server_errors_and_lost_connections_retry_with_back_off_and_the_same_bytes(
    config: NodeConfig, sessions: sessionmaker[Session],
) -> None:
    queued = queue_delta(config, sessions)
    server = FakeServer(uploads=[answer(503, "database unreachable"), unreachable,
                                 answer(401, "unknown token"), accepted()])
    clock = Clock()
    sync = client(config, sessions, server, clock)
    delays = []
    for expected_error in ("HTTP 503: database unreachable", "ConnectError", "HTTP 401"):
        assert sync.upload_due() == 1
        row = upload_row(sessions, queued.id)
        assert row.state == UploadState.PENDING
        assert expected_error in (row.last_error or "")
        delays.append((row.next_attempt_at - clock.now).total_seconds())
        clock.now += timedelta(seconds=1)
        assert sync.upload_due() == 0, "not due before its back-off"
        clock.now = row.next_attempt_at
    assert delays == [5, 10, 12], "doubling, capped at retry_max_s"
    assert sync.upload_due() == 1
    row = upload_row(sessions, queued.id)
    assert (row.state, row.attempts) == (UploadState.SENT, 4)
    posted = server.posted()
    assert len(posted) == 4
    assert {request.headers["idempotency-key"] for request in posted} == {queued.idempotency_key}
    assert len({request.content for request in posted}) == 1, "identical bytes every time"


def test_an_unreachable_server_ends_the_batch(
    config: NodeConfig, sessions: sessionmaker[Session],
) -> None:
    first = queue_delta(config, sessions, local_round=1)
    second = queue_delta(config, sessions, local_round=2)
    server = FakeServer(uploads=[unreachable])
    assert client(config, sessions, server).upload_due() == 1
    assert upload_row(sessions, first.id).attempts == 1
    assert upload_row(sessions, second.id).attempts == 0, "not tried against a dead server"


def test_a_refused_update_is_given_up_with_the_servers_reason(
    config: NodeConfig, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture,
) -> None:
    queued = queue_delta(config, sessions)
    server = FakeServer(uploads=[answer(422, "update norm 41.2 is an outlier (limit 9.5)")])
    clock = Clock()
    sync = client(config, sessions, server, clock)
    with caplog.at_level(logging.ERROR, logger="dafne_node.learning.sync"):
        assert sync.upload_due() == 1
    row = upload_row(sessions, queued.id)
    assert row.state == UploadState.REFUSED
    assert row.last_error == "HTTP 422: update norm 41.2 is an outlier (limit 9.5)"
    assert "outlier" in caplog.text
    clock.now += timedelta(days=1)
    assert sync.upload_due() == 0
    assert len(server.posted()) == 1, "never sent again"


def test_a_node_killed_between_encoding_and_sending_sends_the_same_payload(
    config: NodeConfig, sessions: sessionmaker[Session],
) -> None:
    class Killed(BaseException):
        """The process dies in the middle of the request."""

    queued = queue_delta(config, sessions)
    sent_before_kill: list[bytes] = []

    def die(request: httpx.Request) -> httpx.Response:
        sent_before_kill.append(request.content)
        raise Killed

    first = client(config, sessions, FakeServer(uploads=[die]))
    with pytest.raises(Killed):
        first.upload_due()
    del first
    row = upload_row(sessions, queued.id)
    assert (row.state, row.attempts) == (UploadState.PENDING, 0)
    assert row.payload_path is not None and Path(row.payload_path).is_file()
    residual = (config.node.data_dir / "federation" / RESIDUAL_FILE).read_bytes()

    server = FakeServer(uploads=[accepted()])
    assert client(config, sessions, server).upload_due() == 1
    [request] = server.posted()
    assert request.content == sent_before_kill[0], "not encoded again"
    assert request.headers["idempotency-key"] == queued.idempotency_key
    assert (config.node.data_dir / "federation" / RESIDUAL_FILE).read_bytes() == residual, \
        "the residual moved on once"
    assert upload_row(sessions, queued.id).state == UploadState.SENT


def test_a_lost_payload_file_is_encoded_again_under_the_same_key(
    config: NodeConfig, sessions: sessionmaker[Session],
) -> None:
    queued = queue_delta(config, sessions)
    clock = Clock()
    server = FakeServer(uploads=[answer(502, "bad gateway"), accepted()])
    sync = client(config, sessions, server, clock)
    assert sync.upload_due() == 1
    row = upload_row(sessions, queued.id)
    assert row.payload_path is not None
    Path(row.payload_path).unlink()
    clock.now = row.next_attempt_at
    assert sync.upload_due() == 1
    first, second = server.posted()
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] \
        == queued.idempotency_key
    assert decode_update(second.content).metadata.base_generation == 1
    assert Path(row.payload_path).read_bytes() == second.content
    assert upload_row(sessions, queued.id).state == UploadState.SENT


def test_a_residual_left_behind_by_a_kill_after_the_payload_was_recorded_is_kept(
    config: NodeConfig, sessions: sessionmaker[Session],
) -> None:
    queued = queue_delta(config, sessions)
    server = FakeServer(uploads=[answer(503, "busy"), accepted()])
    clock = Clock()
    assert client(config, sessions, server, clock).upload_due() == 1
    federation = config.node.data_dir / "federation"
    residual = (federation / RESIDUAL_FILE).read_bytes()
    # As if killed after recording the payload, before the new residual replaced the old.
    pending = federation / "outbox" / f"{queued.id}.residual.safetensors"
    (federation / RESIDUAL_FILE).rename(pending)

    clock.now += timedelta(minutes=1)
    assert client(config, sessions, server, clock).upload_due() == 1
    assert (federation / RESIDUAL_FILE).read_bytes() == residual
    assert not pending.exists()
    first, second = server.posted()
    assert first.content == second.content


def test_only_one_process_syncs_a_model_at_a_time(
    config: NodeConfig, sessions: sessionmaker[Session],
) -> None:
    queue_delta(config, sessions)
    clock = Clock()
    server = FakeServer(uploads=[accepted()])
    other = SyncClient(config, sessions, transport=server.transport(), clock=clock,
                       owner="another-process")
    assert other.poll().outcome == "failed"  # took the lease; the server has no generation
    mine = client(config, sessions, server, clock)
    assert mine.upload_due() == 0
    assert mine.poll().outcome == "busy"
    clock.now += timedelta(hours=1)  # the other process died: its lease ran out
    assert mine.upload_due() == 1


# -- pulling generations ------------------------------------------------------------------


def test_poll_installs_a_signed_generation_and_every_process_switches_to_it(
    config: NodeConfig, sessions: sessionmaker[Session], models: ActiveModel,
    generation: Generation,
) -> None:
    assert models.current().manifest.generation == 1
    server = FakeServer(generation=generation)
    sync = client(config, sessions, server)
    result = sync.poll()
    assert (result.outcome, result.generation) == ("installed", 2)

    target = config.node.data_dir / "models" / "dafne-leg-g2"
    assert (target / MANIFEST_FILE).read_bytes() == generation.manifest, "the signed bytes"
    assert (target / SIGNATURE_FILE).read_text().strip() == generation.signature
    assert (target / WEIGHTS_FILE).read_bytes() == generation.weights
    with sessions() as session:
        row = active_model(session)
        state = session.get(FederationSync, "leg")
    assert row is not None and state is not None
    assert (row.generation, row.local_round, row.source, Path(row.path)) == \
        (2, 0, "federation", target)
    assert (state.generation_pulled, state.etag, state.last_error) == (2, '"leg-2"', None)
    assert state.last_poll_at == state.last_success_at == T0
    assert models.current().manifest.generation == 2, "the running process switched"
    assert ActiveModel(sessions, config).segmenter.manifest.generation == 2, \
        "and a restarted one stays on it"

    requests = len(server.requests)
    assert sync.poll().outcome == "unchanged"
    [latest] = server.requests[requests:]
    assert latest.headers["if-none-match"] == '"leg-2"', "304: nothing downloaded"


def test_a_generation_not_newer_than_the_one_in_use_is_not_downloaded(
    config: NodeConfig, sessions: sessionmaker[Session], models: ActiveModel,
    generation: Generation,
) -> None:
    server = FakeServer(generation=generation, number=1)
    result = client(config, sessions, server).poll()
    assert (result.outcome, result.generation) == ("current", 1)
    assert server.paths() == ["GET /v1/models/leg/generations/latest"]
    assert models.current().manifest.generation == 1


def test_a_generation_that_cannot_be_fetched_is_tried_again_at_the_next_poll(
    config: NodeConfig, sessions: sessionmaker[Session], models: ActiveModel,
    generation: Generation,
) -> None:
    server = FakeServer(generation=generation, weights_status=503)
    sync = client(config, sessions, server)
    result = sync.poll()
    assert result.outcome == "failed" and "HTTP 503" in (result.reason or "")
    with sessions() as session:
        state = session.get(FederationSync, "leg")
        assert state is not None
        assert "HTTP 503" in (state.last_error or "")
        assert (state.last_success_at, state.etag, state.refused_generation) == \
            (None, None, None)
    assert not (config.node.data_dir / "models" / "dafne-leg-g2").exists()

    server.weights_status = 200
    assert sync.poll().outcome == "installed"
    assert models.current().manifest.generation == 2


def _tamper_weights(generation: Generation, key: Ed25519PrivateKey) -> Generation:
    weights = bytearray(generation.weights)
    weights[-1] ^= 0x01
    return Generation(generation.manifest, generation.signature, bytes(weights))


def _bad_signature(generation: Generation, key: Ed25519PrivateKey) -> Generation:
    return Generation(generation.manifest, base64.b64encode(bytes(64)).decode(),
                      generation.weights)


def _other_key(generation: Generation, key: Ed25519PrivateKey) -> Generation:
    return Generation(generation.manifest, sign(Ed25519PrivateKey.generate(),
                                                generation.manifest), generation.weights)


def _resigned(change: Callable[[dict[str, object]], None]
              ) -> Callable[[Generation, Ed25519PrivateKey], Generation]:
    def make(generation: Generation, key: Ed25519PrivateKey) -> Generation:
        manifest = json.loads(generation.manifest)
        change(manifest)
        data = json.dumps(manifest, indent=2).encode()
        return Generation(data, sign(key, data), generation.weights)
    return make


def _set_generation(manifest: dict[str, object]) -> None:
    manifest["generation"] = 3


def _set_architecture(manifest: dict[str, object]) -> None:
    architecture = manifest["architecture"]
    assert isinstance(architecture, dict)
    architecture["params"]["base_channels"] = 8


def _no_signature(generation: Generation, key: Ed25519PrivateKey) -> Generation:
    return Generation(generation.manifest, "", generation.weights)


@pytest.mark.parametrize(("tamper", "reason"), [
    (_tamper_weights, "sha256"),
    (_bad_signature, "bad signature: signature does not verify"),
    (_other_key, "bad signature: signature does not verify"),
    (_resigned(_set_generation), "it is generation 3, not 2"),
    (_resigned(_set_architecture), "architecture unet2d-res"),
    (_no_signature, "without a Dafne-Signature header"),
], ids=["tampered-weights", "bad-signature", "other-key", "other-generation",
        "other-architecture", "no-signature"])
def test_a_generation_that_fails_verification_is_refused_before_loading(
    config: NodeConfig, sessions: sessionmaker[Session], models: ActiveModel,
    generation: Generation, server_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tamper: Callable[[Generation, Ed25519PrivateKey], Generation], reason: str,
) -> None:
    def must_not_load(path: object) -> None:
        raise AssertionError(f"{path} was loaded before it was verified")

    monkeypatch.setattr(sync_module, "load_model_dir", must_not_load)
    server = FakeServer(generation=tamper(generation, server_key))
    sync = client(config, sessions, server)
    with caplog.at_level(logging.ERROR, logger="dafne_node.learning.sync"):
        result = sync.poll()
    assert (result.outcome, result.generation) == ("refused", 2)
    assert reason in (result.reason or "")
    assert "refused" in caplog.text and reason in caplog.text

    assert not (config.node.data_dir / "models" / "dafne-leg-g2").exists()
    assert list((config.node.data_dir / "federation" / "incoming").iterdir()) == []
    with sessions() as session:
        rows = session.scalars(select(Model)).all()
        state = session.get(FederationSync, "leg")
    assert [(row.generation, row.active) for row in rows] == [(1, True)], "g1 kept"
    assert state is not None and state.refused_generation == 2
    assert reason in (state.refused_reason or "")
    assert models.current().manifest.generation == 1

    requests = len(server.requests)
    assert sync.poll().outcome == "unchanged", "not downloaded again"
    assert len(server.requests) == requests + 1


# -- the trainer queues deltas ------------------------------------------------------------


def _train_config(node: Node, tmp_path: Path, federation: str) -> NodeConfig:
    toml = tmp_path / "train.toml"
    toml.write_text(f"[training]\nsteps = 2\nthreads = 1\n{federation}")
    return load_config(toml, environ={},
                       overrides={("node", "data_dir"): node[0].node.data_dir})


def test_an_accepted_run_queues_one_upload_against_the_pulled_generation(
    corrected: Node, tmp_path: Path, generation_dir: Path, server_key: Ed25519PrivateKey,
) -> None:
    _, sessions = corrected
    key = public_key_text(server_key.public_key())
    config = _train_config(corrected, tmp_path, f'[federation]\nurl = "{URL}"\n'
                           f'token = "{TOKEN}"\npublic_key = "{key}"\n')
    pulled = load_manifest(generation_dir)
    with sessions() as session, session.begin():
        register_active_model(session, name=pulled.name, generation=2,
                              path=str(generation_dir), sha256=pulled.weights.sha256,
                              source="federation", manifest=pulled.model_dump(mode="json"))
    outcome = run_now(sessions, config, stop=threading.Event(), progress=False)
    assert outcome["outcome"] == "accepted", outcome
    assert outcome["version_label"] == "g2-local1"
    with sessions() as session:
        [upload] = session.scalars(select(FederationUpload)).all()
    assert Path(upload.delta_path) == Path(outcome["delta_path"]).resolve()
    assert (upload.state, upload.base_generation, upload.local_round) == \
        (UploadState.PENDING, 2, 1)
    metadata = read_delta_metadata(upload.delta_path)
    assert (metadata.base_generation, metadata.base_sha256) == (2, pulled.weights.sha256), \
        "the delta is against the pulled root generation"


def test_without_federation_an_accepted_run_queues_nothing(
    corrected: Node, tmp_path: Path,
) -> None:
    _, sessions = corrected
    config = _train_config(corrected, tmp_path, "")
    outcome = run_now(sessions, config, stop=threading.Event(), progress=False)
    assert outcome["outcome"] == "accepted", outcome
    with sessions() as session:
        assert session.scalars(select(FederationUpload)).all() == []


# -- what IT sees -------------------------------------------------------------------------


def test_status_cli_api_and_metrics_show_the_sync(
    config: NodeConfig, sessions: sessionmaker[Session], models: ActiveModel,
    generation: Generation, capsys: pytest.CaptureFixture[str],
) -> None:
    queue_delta(config, sessions, local_round=1)
    waiting = queue_delta(config, sessions, local_round=2)
    clock = Clock()
    server = FakeServer(generation=generation,
                        uploads=[accepted("b" * 32), answer(503, "try later")])
    sync = client(config, sessions, server, clock)
    assert sync.poll().outcome == "installed"
    assert sync.upload_due() == 2

    with sessions() as session:
        status = collect_status(session, model_name="Dafne leg", model_generation=2,
                                now=T0 + timedelta(minutes=2), federation=config.federation)
    federation = status.federation
    assert (federation.enabled, federation.url, federation.model) == (True, URL, "leg")
    assert (federation.generation_in_use, federation.generation_pulled) == (2, 2)
    assert (federation.last_poll_at, federation.last_success_at, federation.last_error) == \
        (T0, T0, None)
    assert federation.uploads == {"pending": 1, "sent": 1, "refused": 0}
    assert federation.last_upload is not None
    assert (federation.last_upload.id, federation.last_upload.state,
            federation.last_upload.last_error) == (waiting.id, "pending", "HTTP 503: try later")
    text = format_status(status)
    assert f"Federation: {URL}, model leg; generation in use g2, pulled g2" in text
    assert "uploads: pending 1  sent 1  refused 0" in text
    assert f"last upload #{waiting.id} (g1-local2): pending after 1 attempt(s)" in text

    toml = config.node.data_dir.parent / "node.toml"
    assert main(["status", "--json", "--config", str(toml),
                 "--data-dir", str(config.node.data_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)["federation"]
    assert (shown["generation_pulled"], shown["uploads"]["sent"]) == (2, 1)
    assert TOKEN not in json.dumps(shown)

    app = create_app(session_factory=sessions, model_info=lambda: ("Dafne leg", 2),
                     federation=config.federation)
    with TestClient(app) as api:
        assert api.get("/status").json()["federation"]["uploads"]["pending"] == 1
        metrics = api.get("/metrics").text
    samples = {(sample.name, tuple(sample.labels.items())): sample.value
               for family in text_string_to_metric_families(metrics)
               for sample in family.samples}
    assert samples[("dafne_federation_uploads", (("state", "pending"),))] == 1
    assert samples[("dafne_federation_uploads", (("state", "sent"),))] == 1
    assert samples[("dafne_federation_last_success_timestamp_seconds", ())] == T0.timestamp()


def test_a_node_without_federation_shows_it_off(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        status = collect_status(session, model_name="Dafne leg", model_generation=1)
    assert status.federation.enabled is False and status.federation.uploads == {}
    assert "Federation: off" in format_status(status)


# -- the loop in the node process ---------------------------------------------------------


def _wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_loop_pulls_and_uploads_and_stops_at_once(
    tmp_path: Path, server_key: Ed25519PrivateKey, sessions: sessionmaker[Session],
    models: ActiveModel, generation: Generation, config: NodeConfig,
) -> None:
    fast = node_config(tmp_path, public_key_text(server_key.public_key()),
                       poll_interval_s=0.5)
    queued = queue_delta(fast, sessions, now=utcnow())
    server = FakeServer(generation=generation, uploads=[accepted()])
    sync = SyncClient(fast, sessions, transport=server.transport(), owner="loop")
    stop = threading.Event()
    thread = threading.Thread(target=sync.run, args=(stop,))
    thread.start()
    try:
        _wait_for(lambda: upload_row(sessions, queued.id).state == UploadState.SENT)
        _wait_for(lambda: models.current().manifest.generation == 2)
        polls = server.paths().count("GET /v1/models/leg/generations/latest")
        _wait_for(lambda: server.paths().count("GET /v1/models/leg/generations/latest")
                  > polls + 1)
    finally:
        stopped_at = time.monotonic()
        stop.set()
        thread.join(5)
    assert not thread.is_alive() and time.monotonic() - stopped_at < 1.0


def test_a_stopped_loop_gives_its_lease_back(
    config: NodeConfig, sessions: sessionmaker[Session],
) -> None:
    server = FakeServer()
    sync = SyncClient(config, sessions, transport=server.transport(), owner="stopping")
    stop = threading.Event()
    thread = threading.Thread(target=sync.run, args=(stop,))
    thread.start()
    try:
        _wait_for(lambda: "GET /v1/models/leg/generations/latest" in server.paths())
    finally:
        stop.set()
        thread.join(5)
    with sessions() as session:
        assert sync_state(session, "leg").lease_owner is None
    # another process (or this node started again) syncs at once, no lease to wait out
    other = SyncClient(config, sessions, transport=server.transport(), owner="next")
    assert other.poll().outcome != "busy"


def test_the_node_process_runs_the_sync_and_records_an_unreachable_server(
    tmp_path: Path, server_key: Ed25519PrivateKey,
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = node_config(tmp_path, public_key_text(server_key.public_key()),
                         url=f"http://127.0.0.1:{port}", timeout_s=2)
    node = NodeProcess(config, dicom=False, http=False, sync=True)
    node.start()
    try:
        assert "federation-sync" in {thread.name for thread in threading.enumerate()}

        def failed() -> bool:
            with node.sessions() as session:
                state = session.get(FederationSync, "leg")
                return state is not None and state.last_error is not None
        _wait_for(failed)
    finally:
        stopped_at = time.monotonic()
        node.stop(timeout=10)
    assert time.monotonic() - stopped_at < 5
    assert "federation-sync" not in {thread.name for thread in threading.enumerate()}
    engine = make_engine(config.database_url)
    with make_session_factory(engine)() as session:
        state = session.get(FederationSync, "leg")
        assert state is not None and "ConnectError" in (state.last_error or "")
    engine.dispose()


def _encoding(upload: FederationUpload, residual: dict[str, torch.Tensor] | None
              ) -> EncodedUpdate:
    delta = load_delta(upload.delta_path)
    return encode_update(delta.tensors, delta.metadata, density=0.2, residual=residual)


def _same_tensors(payload: bytes, expected: EncodedUpdate) -> bool:
    sent, wanted = decode_update(payload).tensors, decode_update(expected.payload).tensors
    return all(torch.equal(sent[name], wanted[name]) for name in wanted)


def test_a_cumulative_delta_names_the_upload_it_continues_and_leaves_the_residual_out(
    config: NodeConfig, sessions: sessionmaker[Session],
) -> None:
    """Round 2 trained on from round 1: it contains round 1, whose residual would count twice."""
    server = FakeServer(uploads=[accepted(), accepted(), accepted()])
    sync = client(config, sessions, server)
    first = queue_delta(config, sessions, local_round=1)
    assert sync.upload_due() == 1
    same_base = queue_delta(config, sessions, local_round=2, continues_round=1)
    newer_base = queue_delta(config, sessions, local_round=1, base_generation=2)

    assert sync.upload_due() == 2

    posted_first, cumulative, carried = server.posted()
    assert decode_update(posted_first.content).metadata.continues is None
    assert decode_update(cumulative.content).metadata.continues == first.idempotency_key
    assert _same_tensors(cumulative.content, _encoding(same_base, None))
    left_over = _encoding(same_base, None).residual
    assert decode_update(carried.content).metadata.continues is None
    assert _same_tensors(carried.content, _encoding(newer_base, left_over))
    assert not _same_tensors(carried.content, _encoding(newer_base, None))


def test_a_delta_of_its_own_against_the_same_generation_gets_the_residual(
    config: NodeConfig, sessions: sessionmaker[Session],
) -> None:
    """A run that started from the generation again (local models not activated) contains
    nothing of the last upload: what that encoding left out is still owed."""
    server = FakeServer(uploads=[accepted(), accepted()])
    sync = client(config, sessions, server)
    first = queue_delta(config, sessions, local_round=1)
    assert sync.upload_due() == 1
    own = queue_delta(config, sessions, local_round=2)
    assert sync.upload_due() == 1

    _, second = server.posted()
    assert decode_update(second.content).metadata.continues is None
    assert _same_tensors(second.content, _encoding(own, _encoding(first, None).residual))
