"""Twenty nodes upload at once to two API processes and one worker on PostgreSQL.

The federation server scales out on PostgreSQL: any number of stateless ``dafne-federation
serve`` processes share the database, and ``dafne-federation worker`` aggregates under the
model's lease. Every update must end in exactly one generation (promoted or rejected) or be
refused with a reason; a retried upload must not count twice; nothing may be lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.fed_models import FedGeneration, FedUpdate, GenerationState, UpdateState
from db.session import make_engine
from tests.federation.server import (
    FederationSetup,
    bundled_model,
    make_update,
    set_up,
    start_api,
    start_worker,
)
from tests.postgres import PG_URL, temporary_schema

pytestmark = pytest.mark.postgres

NODES = 20
UPLOADS_PER_NODE = 2


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[FederationSetup]:
    with temporary_schema("t_fed_scale") as schema:
        # Screening scores every buffered update once more; it has its own tests, and here
        # it would only make the one worker the bottleneck of a test about scaling out.
        sections = {"aggregation": {"buffer_size": 6, "flush_interval_s": 3.0,
                                    "check_every_s": 0.5},
                    "gate": {"screen_updates": False}}
        yield set_up(tmp_path, database_url=f"{PG_URL}?options=-csearch_path%3D{schema}",
                     sections=sections, nodes=tuple(f"node-{n:02d}" for n in range(NODES)))


def test_twenty_nodes_two_api_processes_one_worker(setup: FederationSetup) -> None:
    base = bundled_model()
    bodies = {(n, u): make_update(base, seed=n * 10 + u, num_samples=1 + n % 5)
              for n in range(NODES) for u in range(UPLOADS_PER_NODE)}
    bodies[(3, 1)] = b"truncated" + bodies[(3, 1)][:100]  # one malformed upload
    answers: dict[tuple[int, int], list[tuple[int, dict[str, object]]]] = {}
    lock = threading.Lock()
    with start_api(setup) as first, start_api(setup) as second, start_worker(setup):
        start = threading.Barrier(NODES)

        def node(n: int) -> None:
            url = (first, second)[n % 2]
            token = setup.tokens[f"node-{n:02d}"]
            with httpx.Client(base_url=url, timeout=60,
                              headers={"Authorization": f"Bearer {token}"}) as client:
                start.wait()
                for u in range(UPLOADS_PER_NODE):
                    for _attempt in range(2):  # every upload is retried once: a lost answer
                        response = client.post("/v1/models/leg/updates", content=bodies[n, u],
                                               headers={"Idempotency-Key": f"run-{u}"})
                        with lock:
                            answers.setdefault((n, u), []).append(
                                (response.status_code, response.json()))

        threads = [threading.Thread(target=node, args=(n,)) for n in range(NODES)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(answers) == NODES * UPLOADS_PER_NODE
        engine = make_engine(setup.config.database_url)
        deadline = time.monotonic() + 180
        while True:
            with Session(engine) as session:
                waiting = session.scalars(select(FedUpdate).where(
                    FedUpdate.state == UpdateState.PENDING)).all()
            if not waiting:
                break
            assert time.monotonic() < deadline, f"{len(waiting)} updates still pending"
            time.sleep(1)

    for (n, u), pair in answers.items():
        assert pair[0] == pair[1], f"node {n} upload {u}: a retry got another answer"
    assert answers[3, 1][0][0] == 422
    accepted = {str(body["id"]) for (status, body), _ in answers.values() if status == 202}
    assert len(accepted) == NODES * UPLOADS_PER_NODE - 1

    with Session(engine) as session:
        updates = session.scalars(select(FedUpdate)).all()
        generations = session.scalars(select(FedGeneration).order_by(FedGeneration.id)).all()
        assert len(updates) == NODES * UPLOADS_PER_NODE  # no duplicate from the retries
        refused = [u for u in updates if u.state == UpdateState.REFUSED]
        assert len(refused) == 1 and "malformed update" in (refused[0].reason or "")
        in_generations: dict[str, int] = {}
        for generation in generations[1:]:  # the seed contains no update
            for update in generation.updates:
                assert update.id not in in_generations, "an update was applied twice"
                in_generations[update.id] = generation.id
        assert set(in_generations) == accepted  # none lost
        for update in updates:
            if update.id in accepted:
                generation = next(g for g in generations if g.id == update.generation_id)
                expected = UpdateState.APPLIED if generation.state == GenerationState.PROMOTED \
                    else UpdateState.REJECTED
                assert update.state == expected
        numbers = [g.number for g in generations if g.state == GenerationState.PROMOTED]
        assert numbers == list(range(1, len(numbers) + 1))  # one aggregator at a time
        assert len(numbers) >= 2
    engine.dispose()
