"""The federation API as nodes and operators use it, on SQLite and on PostgreSQL.

The server is set up with the real CLI (init, model init, node add) and served in-process
with FastAPI's test client; updates are encoded with the node's own codec.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import save

from dafne_node.learning.update import Encoding
from dafne_node.model.manifest import ModelManifest
from dafne_node.model.signature import parse_public_key, verify_signature
from federation.app import create_app
from tests.federation.server import (
    BaseModel,
    FederationSetup,
    bundled_model,
    make_update,
    run_cli,
    set_up,
)
from tests.postgres import PG_URL, temporary_schema


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return bundled_model()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FederationSetup]:
    if request.param == "sqlite":
        yield set_up(tmp_path, nodes=("hospital-a", "hospital-b"))
        return
    with temporary_schema("fed_api") as schema:
        yield set_up(tmp_path, database_url=f"{PG_URL}?options=-csearch_path%3D{schema}",
                     nodes=("hospital-a", "hospital-b"))


@pytest.fixture
def client(setup: FederationSetup) -> Iterator[TestClient]:
    with TestClient(create_app(setup.config)) as test_client:
        yield test_client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(client: TestClient, token: str, body: bytes, key: str, model: str = "leg"):
    return client.post(f"/v1/models/{model}/updates", content=body,
                       headers={**auth(token), "Idempotency-Key": key,
                                "Content-Type": "application/octet-stream"})


def test_health_needs_no_token_and_everything_else_does(client: TestClient,
                                                        setup: FederationSetup) -> None:
    assert client.get("/v1/health").json() == {"status": "ok"}
    missing = client.get("/v1/models")
    assert missing.status_code == 401
    assert "bearer token" in missing.json()["detail"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = client.get("/v1/models", headers=auth("dfn_not-a-token"))
    assert wrong.status_code == 401
    assert wrong.json()["detail"] == "unknown or revoked token"
    audit = client.get("/v1/admin/audit", headers=auth(setup.admin_token)).json()
    refused = [a for a in audit if a["status"] == 401]
    assert {a["reason"] for a in refused} == {missing.json()["detail"], "unknown or revoked token"}
    assert all(a["actor"] is None and a["path"] == "/v1/models" for a in refused)


def test_a_node_pulls_a_signed_generation_it_can_verify(client: TestClient,
                                                        setup: FederationSetup,
                                                        base: BaseModel) -> None:
    token = setup.tokens["hospital-a"]
    models = client.get("/v1/models", headers=auth(token)).json()
    assert models == [{"name": "leg", "architecture": base.architecture, "latest_generation": 1,
                       "can_pull": True, "can_push": True}]
    latest = client.get("/v1/models/leg/generations/latest", headers=auth(token))
    assert latest.status_code == 200
    info = latest.json()
    assert info["number"] == 1 and info["sha256"] == base.sha256  # the model nodes run
    assert latest.headers["ETag"] == '"leg-1"'
    again = client.get("/v1/models/leg/generations/latest",
                       headers={**auth(token), "If-None-Match": '"leg-1"'})
    assert again.status_code == 304 and again.content == b""

    manifest = client.get(info["manifest_url"], headers=auth(token))
    signature = manifest.headers["Dafne-Signature"]
    assert signature == info["signature"]
    verify_signature(parse_public_key(setup.public_key), manifest.content, signature)
    parsed = ModelManifest.model_validate_json(manifest.content)
    assert parsed.generation == 1 and parsed.weights.sha256 == base.sha256
    weights = client.get(info["weights_url"], headers=auth(token))
    assert hashlib.sha256(weights.content).hexdigest() == parsed.weights.sha256
    assert weights.headers["ETag"] == f'"{base.sha256}"'


def test_an_update_is_accepted_once_and_its_replay_gets_the_same_answer(
        client: TestClient, setup: FederationSetup, base: BaseModel) -> None:
    token = setup.tokens["hospital-a"]
    body = make_update(base, seed=1)
    first = upload(client, token, body, "run-1")
    assert first.status_code == 202, first.text
    answer = first.json()
    assert answer["state"] == "pending" and answer["base_generation"] == 1
    assert answer["num_samples"] == 4 and 0 < answer["l2_norm"] < 10
    replay = upload(client, token, body, "run-1")
    assert replay.status_code == 202 and replay.json() == answer
    assert replay.headers["Idempotent-Replayed"] == "true"
    state = client.get(f"/v1/updates/{answer['id']}", headers=auth(token)).json()
    assert state["state"] == "pending" and state["id"] == answer["id"]
    # another node cannot see it; the admin can
    other = client.get(f"/v1/updates/{answer['id']}", headers=auth(setup.tokens["hospital-b"]))
    assert other.status_code == 404
    assert client.get(f"/v1/updates/{answer['id']}",
                      headers=auth(setup.admin_token)).status_code == 200
    status = client.get("/v1/admin/status", headers=auth(setup.admin_token)).json()
    assert status["models"][0]["pending"] == 1
    audit = client.get("/v1/admin/audit", headers=auth(setup.admin_token)).json()
    uploads = [a for a in audit if a["method"] == "POST"]
    assert [(a["actor"], a["status"]) for a in uploads] == [("hospital-a", 202)] * 2


def _replace(base: BaseModel, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    delta = {k: torch.zeros_like(v, dtype=torch.float16) for k, v in base.state.items()}
    delta[name] = value
    return delta


def test_bad_updates_are_refused_with_reasons_and_replayed_refusals_stay_refused(
        client: TestClient, setup: FederationSetup, base: BaseModel) -> None:
    token = setup.tokens["hospital-a"]
    first = next(iter(base.state))
    shape = base.state[first].shape
    cases = {
        "garbage": (b"not an update at all", 422, "malformed update"),
        "unknown-base": (make_update(base, base_generation=7), 409,
                         "base generation 7"),
        "wrong-sha": (make_update(base, base_sha256="0" * 64), 409, "not the sha256"),
        "outlier": (make_update(base, scale=1.0), 422, "exceeds the outlier bound"),
    }
    for key, (body, status, reason) in cases.items():
        answer = upload(client, token, body, key)
        assert answer.status_code == status, (key, answer.text)
        assert reason in answer.json()["detail"], (key, answer.json())
        replay = upload(client, token, body, key)
        assert (replay.status_code, replay.json()) == (status, answer.json())
    wrong_shape = make_update(base, _replace(base, first, torch.zeros(
        (shape[0] + 1, *shape[1:]), dtype=torch.float16)))
    answer = upload(client, token, wrong_shape, "wrong-shape")
    assert answer.status_code == 422 and first in answer.json()["detail"]
    status = client.get("/v1/admin/status", headers=auth(setup.admin_token)).json()
    refused = {r["id"]: r for r in status["models"][0]["refused"]}
    assert len(refused) == 5 and all(r["reason"] for r in refused.values())


def test_rights_and_revocation(client: TestClient, setup: FederationSetup,
                               base: BaseModel) -> None:
    reader = setup.add_node("reader", pull_only=True)
    assert client.get("/v1/models/leg/generations/latest",
                      headers=auth(reader)).status_code == 200
    refused = upload(client, reader, make_update(base), "k")
    assert refused.status_code == 403 and "may not push" in refused.json()["detail"]
    assert upload(client, setup.tokens["hospital-a"], make_update(base), "k",
                  model="arm").status_code == 404
    assert client.get("/v1/admin/status", headers=auth(reader)).status_code == 403
    writer = setup.tokens["hospital-b"]
    run_cli("node", "rights", "hospital-b", "leg", "none", "--config", str(setup.config_path))
    assert client.get("/v1/models", headers=auth(writer)).json() == []
    assert client.get("/v1/models/leg/generations/latest",
                      headers=auth(writer)).status_code == 403
    run_cli("node", "rights", "hospital-b", "leg", "pull+push", "--config",
            str(setup.config_path))
    assert upload(client, writer, make_update(base), "k").status_code == 202
    run_cli("node", "revoke", "reader", "--config", str(setup.config_path))
    assert client.get("/v1/models", headers=auth(reader)).status_code == 401


def test_malformed_parameters_get_a_one_line_reason(client: TestClient,
                                                     setup: FederationSetup) -> None:
    answer = client.get("/v1/models/leg/generations/two/weights",
                        headers=auth(setup.tokens["hospital-a"]))
    assert answer.status_code == 422
    assert answer.json() == {"detail": answer.json()["detail"]}
    assert answer.json()["detail"].startswith("path number: ")
    missing = client.get("/v1/models/leg/generations/9/weights",
                         headers=auth(setup.tokens["hospital-a"]))
    assert missing.status_code == 404 and "no promoted generation 9" in missing.json()["detail"]


def test_oversized_body_is_refused_before_it_is_read(client: TestClient,
                                                     setup: FederationSetup) -> None:
    limit = int(setup.config.server.max_update_mb * 1024 * 1024)
    answer = upload(client, setup.tokens["hospital-a"], b"\0" * (limit + 1), "big")
    assert answer.status_code == 413 and "exceeds the limit" in answer.json()["detail"]


def test_missing_idempotency_key_is_a_bad_request(client: TestClient, setup: FederationSetup,
                                                  base: BaseModel) -> None:
    answer = client.post("/v1/models/leg/updates", content=make_update(base),
                         headers=auth(setup.tokens["hospital-a"]))
    assert answer.status_code == 400 and "Idempotency-Key" in answer.json()["detail"]


def _edited_payload(base: BaseModel, folder: Path, edit) -> tuple[bytes, str]:
    """A valid fp16 update edited the way a hostile client would (the encoder refuses)."""
    path = folder / "update"
    path.write_bytes(make_update(base, encoding=Encoding.FP16))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(iter(tensors))
    tensors[name] = edit(tensors[name])
    return save(tensors, metadata=metadata), name


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda t: t.index_fill(0, torch.tensor([0]), math.nan), "NaN"),
    (lambda t: t.float(), "has dtype 'F32', expected F16"),
])
def test_nan_or_a_wrong_dtype_is_refused_naming_the_tensor(
        client: TestClient, setup: FederationSetup, base: BaseModel, tmp_path: Path,
        edit, reason: str) -> None:
    body, name = _edited_payload(base, tmp_path, edit)
    answer = upload(client, setup.tokens["hospital-a"], body, "hostile")
    assert answer.status_code == 422, answer.text
    assert reason in answer.json()["detail"] and name in answer.json()["detail"]


def test_openapi_documents_every_endpoint_and_its_errors(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path, method, statuses in [
        ("/v1/models", "get", {"401"}),
        ("/v1/models/{model}/generations/latest", "get", {"304", "401", "403", "404"}),
        ("/v1/models/{model}/generations/{number}/manifest", "get", {"401", "403", "404"}),
        ("/v1/models/{model}/generations/{number}/weights", "get", {"401", "403", "404"}),
        ("/v1/models/{model}/generations", "get", {"401", "403", "404"}),
        ("/v1/models/{model}/updates", "post",
         {"400", "401", "403", "404", "409", "413", "422"}),
        ("/v1/updates/{update_id}", "get", {"401", "404"}),
        ("/v1/admin/status", "get", {"401", "403"}),
    ]:
        operation = paths[path][method]
        assert statuses <= set(operation["responses"]), (path, operation["responses"])
        assert operation["summary"]
