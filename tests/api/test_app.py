"""The admin API through ``fastapi.testclient``: health, status, jobs, retry and metrics."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.api import create_app
from db.node_models import Job, JobState, OutboxItem, OutboxState
from db.session import session_scope
from tests.test_status import ARCHIVE, MODEL, PACS, Populated, populated_factory, sqlite_database


@dataclass
class Node:
    """A migrated SQLite node database with an API in front of it."""

    engine: Engine
    sessions: sessionmaker[Session]
    client: TestClient
    ids: Populated | None = None


def _app(sessions: sessionmaker[Session], ready: Callable[[], bool] | None = None) -> FastAPI:
    return create_app(session_factory=sessions, model_info=lambda: MODEL, ready=ready)


@pytest.fixture
def empty(tmp_path: Path) -> Iterator[Node]:
    engine, sessions = sqlite_database(tmp_path / "node.db")
    with TestClient(_app(sessions)) as client:
        yield Node(engine, sessions, client)
    engine.dispose()


@pytest.fixture
def node(empty: Node) -> Node:
    empty.ids = populated_factory(empty.sessions)
    return empty


def _ids(node: Node) -> Populated:
    assert node.ids is not None
    return node.ids


# -- /health -------------------------------------------------------------------------------


def test_health_ok(empty: Node) -> None:
    response = empty.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "ready": True, "detail": None}


def test_health_not_ready(empty: Node) -> None:
    with TestClient(_app(empty.sessions, ready=lambda: False)) as client:
        response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["ready"] is False
    assert "not ready" in response.json()["detail"]


def test_health_and_metrics_when_the_database_is_gone(tmp_path: Path) -> None:
    folder = tmp_path / "db"
    engine, sessions = sqlite_database(folder / "node.db")
    shutil.rmtree(folder)
    engine.dispose()  # no pooled connection to the deleted file survives
    # building the app after the database is gone also shows create_app does no I/O
    with TestClient(_app(sessions)) as client:
        health = client.get("/health")
        metrics = client.get("/metrics")
    engine.dispose()
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "unavailable"
    assert body["database"].startswith("unreachable: unable to open database file")
    assert "database unreachable" in body["detail"]
    assert metrics.status_code == 503
    assert "database unreachable" in metrics.text


# -- /status -------------------------------------------------------------------------------


def test_status_keys_and_values(node: Node) -> None:
    response = node.client.get("/status")
    assert response.status_code == 200
    data = response.json()
    assert data["instances_received"] == 8
    assert data["jobs"] == {"queued": 1, "running": 0, "sending": 1, "done": 1, "failed": 2,
                            "skipped": 0}
    assert data["model"] == {"name": "dafne-leg", "generation": 3, "version": "g3"}
    assert data["series"]["skipped"] == 1
    assert data["skipped_series"][0]["reason"] == "no routing rule matched"
    assert [d["destination"] for d in data["outbox"]["destinations"]] == [PACS, ARCHIVE]
    assert len(node.client.get("/status", params={"recent": 1}).json()["failed_jobs"]) == 1
    assert node.client.get("/status", params={"recent": -1}).status_code == 422


def test_status_follows_a_hot_swapped_model(empty: Node) -> None:
    current = {"generation": 3}
    app = create_app(session_factory=empty.sessions,
                     model_info=lambda: ("dafne-leg", current["generation"]))
    with TestClient(app) as client:
        assert client.get("/status").json()["model"]["generation"] == 3
        current["generation"] = 4
        assert client.get("/status").json()["model"]["generation"] == 4
        assert 'dafne_model_generation{model="dafne-leg"} 4.0' in client.get("/metrics").text


# -- /jobs ---------------------------------------------------------------------------------


def test_jobs_newest_first_and_filtered(node: Node) -> None:
    ids = _ids(node)
    everything = node.client.get("/jobs").json()
    assert everything["total"] == 5
    assert [job["id"] for job in everything["items"]] == sorted(
        [ids.done_job, ids.failed_before_seg, ids.failed_while_sending, ids.queued_job,
         ids.sending_job], reverse=True)

    failed = node.client.get("/jobs", params={"state": "failed"}).json()
    assert failed["total"] == 2
    assert {job["id"] for job in failed["items"]} == {ids.failed_before_seg,
                                                      ids.failed_while_sending}
    assert all(job["state"] == "failed" for job in failed["items"])
    assert failed["items"][-1]["series_instance_uid"] == "1.2.3.2.2"

    train = node.client.get("/jobs", params={"kind": "train"}).json()
    assert [job["id"] for job in train["items"]] == [ids.queued_job]
    assert train["items"][0]["series_instance_uid"] is None
    none = node.client.get("/jobs", params={"kind": "train", "state": "failed"}).json()
    assert (none["total"], none["items"]) == (0, [])

    page = node.client.get("/jobs", params={"limit": 2, "offset": 1}).json()
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)
    assert [job["id"] for job in page["items"]] == [job["id"] for job in everything["items"][1:3]]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"state": "bogus"}, "'queued', 'running', 'sending', 'done', 'failed' or 'skipped'"),
        ({"kind": "nope"}, "'segment'"),
        ({"limit": 0}, "greater than or equal to 1"),
        ({"offset": -1}, "greater than or equal to 0"),
    ],
)
def test_jobs_bad_query_is_422_with_a_message(empty: Node, params: dict[str, object],
                                              message: str) -> None:
    response = empty.client.get("/jobs", params=params)
    assert response.status_code == 422
    assert message in response.json()["detail"][0]["msg"]


def test_job_detail_with_outbox(node: Node) -> None:
    ids = _ids(node)
    response = node.client.get(f"/jobs/{ids.sending_job}")
    assert response.status_code == 200
    job = response.json()
    assert (job["id"], job["kind"], job["state"]) == (ids.sending_job, "segment", "sending")
    assert job["study_instance_uid"] == "1.2.3.2"
    assert job["series_instance_uid"] == "1.2.3.2.2"
    assert job["result_sop_instance_uid"] == "2.25.5"
    outbox = {item["destination"]: item for item in job["outbox"]}
    assert set(outbox) == {PACS, ARCHIVE}
    assert outbox[PACS]["state"] == "pending"
    assert outbox[PACS]["last_error"] == "connection refused"
    assert outbox[ARCHIVE]["name"] == "archive"
    assert "path" not in outbox[PACS]  # file paths on the node are not part of the API


def test_job_not_found_and_bad_id(empty: Node) -> None:
    response = empty.client.get("/jobs/9999")
    assert response.status_code == 404
    assert response.json() == {"detail": "no job 9999"}
    assert empty.client.get("/jobs/abc").status_code == 422
    assert empty.client.get(f"/jobs/{2**64}").status_code == 422


# -- retry ---------------------------------------------------------------------------------


def test_retry_refuses_a_job_that_has_not_failed(node: Node) -> None:
    ids = _ids(node)
    response = node.client.post(f"/jobs/{ids.queued_job}/retry")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"job {ids.queued_job} is queued; only failed jobs can be retried")
    missing = node.client.post("/jobs/9999/retry")
    assert (missing.status_code, missing.json()["detail"]) == (404, "no job 9999")


def test_retry_of_a_job_that_failed_while_sending_resends_its_seg(node: Node) -> None:
    ids = _ids(node)
    response = node.client.post(f"/jobs/{ids.failed_while_sending}/retry")
    assert response.status_code == 200
    job = response.json()
    assert job["state"] == "sending"  # the SEG exists: only delivery is retried
    assert job["error"] is None
    (item,) = job["outbox"]
    assert (item["state"], item["attempts"], item["last_error"]) == ("pending", 0, None)
    with session_scope(node.sessions) as session:  # committed, not only answered
        retried = session.get(Job, ids.failed_while_sending)
        assert retried is not None and retried.state == JobState.SENDING
        states = session.scalars(select(OutboxItem.state).where(
            OutboxItem.job_id == ids.failed_while_sending)).all()
        assert states == [OutboxState.PENDING]
    assert node.client.post(f"/jobs/{ids.failed_while_sending}/retry").status_code == 409


def test_retry_of_a_job_that_failed_before_its_seg_queues_it_again(node: Node) -> None:
    ids = _ids(node)
    response = node.client.post(f"/jobs/{ids.failed_before_seg}/retry")
    assert response.status_code == 200
    job = response.json()
    assert (job["state"], job["attempts"], job["error"]) == ("queued", 0, None)
    status = node.client.get("/status").json()
    assert status["jobs"]["failed"] == 1
    assert status["jobs"]["queued"] == 2


# -- /metrics ------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_values(node: Node) -> None:
    response = node.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples[("dafne_instances_received_total", ())] == 8
    assert samples[("dafne_series", (("state", "skipped"),))] == 1
    assert samples[("dafne_series", (("state", "receiving"),))] == 1
    assert samples[("dafne_series", (("state", "complete"),))] == 2
    assert samples[("dafne_jobs", (("kind", "segment"), ("state", "failed")))] == 2
    assert samples[("dafne_jobs", (("kind", "train"), ("state", "queued")))] == 1
    assert samples[("dafne_jobs", (("kind", "sync"), ("state", "running")))] == 0
    assert samples[("dafne_outbox", (("state", "pending"),))] == 2
    assert samples[("dafne_outbox", (("state", "sent"),))] == 1
    assert samples[("dafne_outbox", (("state", "failed"),))] == 1
    assert samples[("dafne_outbox_undelivered", (("destination", PACS), ("state", "failed")))] == 1
    assert samples[("dafne_model_generation", (("model", "dafne-leg"),))] == 3
    assert samples[("dafne_studies", ())] == 2


def test_metrics_are_read_from_the_database_at_scrape_time(node: Node) -> None:
    """Two apps (two node processes) on one database report the same, current numbers."""
    with TestClient(_app(node.sessions)) as other:
        before = _samples(other.get("/metrics").text)
        assert before == _samples(node.client.get("/metrics").text)
        node.client.post(f"/jobs/{_ids(node).failed_before_seg}/retry")
        after = _samples(other.get("/metrics").text)
    assert after[("dafne_jobs", (("kind", "segment"), ("state", "failed")))] == 1
    assert after[("dafne_jobs", (("kind", "segment"), ("state", "queued")))] == 1


def test_metrics_openmetrics_when_asked(empty: Node) -> None:
    response = empty.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_openapi_schema_is_served(empty: Node) -> None:
    paths = empty.client.get("/openapi.json").json()["paths"]
    assert {"/health", "/status", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/retry",
            "/metrics"} <= set(paths)
