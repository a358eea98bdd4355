"""Benchmark: many nodes uploading updates at once, to one and to two API processes.

Sets up a federation server on PostgreSQL the way an operator does (``dafne-federation
init``, ``model init leg``, one ``node add`` per node, each node with its own token) in a
throw-away schema, then runs ``dafne-federation serve`` as real processes and lets
``--nodes`` simulated nodes (one thread and one HTTP connection each, httpx) upload
``--uploads-per-node`` encoded updates each, all starting at the same moment:

* to one API process (every node on it), and
* to two API processes on two ports (nodes split between them) sharing the database and
  the artifact store, as the server scales out.

The updates are real ``topk-int8`` updates of the bundled model (seeded noise deltas,
``--payloads`` different ones cycled; the server checks each in full: format, base
generation, shapes, norm), so each is about 0.5 MB. No aggregation worker runs: this
measures intake (auth, body, checks, artifact written and fsynced, row committed, audit).

Afterwards every run is checked: every upload got exactly one answer (202), every accepted
update is in ``fed_updates`` exactly once under its node and idempotency key, with the id
the node was told, still pending; the audit log has one row per upload; and the admin
status endpoint counts them all as pending.

    .venv/bin/python bench/upload_throughput.py                        # 20 nodes x 10
    .venv/bin/python bench/upload_throughput.py --nodes 40 --uploads-per-node 5 --rounds 2

Prints a Markdown table for docs/benchmarks.md and the command; ``--json OUT`` also writes
the figures. Each API process gets one warm-up upload before the burst (counted in
the checks, not in the figures). Needs the PostgreSQL server of the tests
(``DAFNE_TEST_PG_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from db.fed_models import FedAudit, FedNode, FedUpdate, UpdateState  # noqa: E402 - path above
from db.session import make_engine  # noqa: E402
from tests.federation.server import (  # noqa: E402
    FederationSetup,
    bundled_model,
    make_update,
    set_up,
    start_api,
)
from tests.postgres import PG_URL, temporary_schema  # noqa: E402

UPLOAD_PATH = "/v1/models/leg/updates"
TICK = os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds (user + system) used so far by this process's child processes that run
    (the API processes ``start_api`` spawned)."""
    pids: set[str] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids.update((task / "children").read_text().split())
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def machine_busy() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


@dataclass
class Answer:
    """What one upload got back."""

    node: str
    key: str
    status: int | None
    body: dict[str, Any]
    seconds: float
    error: str | None = None


@dataclass
class Run:
    """One burst of uploads against a number of API processes."""

    apis: int
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0
    bytes_sent: int = 0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_busy: float = 0.0

    @property
    def accepted(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 202]

    def figures(self) -> dict[str, float]:
        latencies = sorted(a.seconds for a in self.answers)
        cuts = statistics.quantiles(latencies, n=20, method="inclusive")
        return {"apis": self.apis, "uploads": len(self.answers),
                "accepted": len(self.accepted), "seconds": self.seconds,
                "updates_per_s": len(self.accepted) / self.seconds,
                "mb_per_s": self.bytes_sent / self.seconds / 1e6,
                "p50_s": statistics.median(latencies), "p95_s": cuts[18],
                "max_s": latencies[-1],
                "server_cpu_ms_per_update": 1000 * self.server_cpu / len(self.answers),
                "client_cpu_ms_per_update": 1000 * self.client_cpu / len(self.answers),
                "machine_busy": self.machine_busy}


def upload_burst(setup: FederationSetup, urls: list[str], payloads: list[bytes], tag: str,
                 uploads: int) -> Run:
    """Every node uploads ``uploads`` updates as fast as it gets answers, all at once."""
    nodes = sorted(setup.tokens)
    run = Run(apis=len(urls))
    lock = threading.Lock()
    started: list[float] = []
    barrier = threading.Barrier(len(nodes), action=lambda: started.append(time.perf_counter()))
    progress = tqdm(total=len(nodes) * uploads, desc=f"{len(urls)} API process(es)",
                    unit="upload")

    def node(index: int, name: str) -> None:
        with httpx.Client(base_url=urls[index % len(urls)], timeout=300, headers={
                "Authorization": f"Bearer {setup.tokens[name]}",
                "Content-Type": "application/octet-stream"}) as client:
            barrier.wait()
            for u in range(uploads):
                body = payloads[(index * uploads + u) % len(payloads)]
                key = f"{tag}-{u}"
                sent = time.perf_counter()
                try:
                    response = client.post(UPLOAD_PATH, content=body,
                                           headers={"Idempotency-Key": key})
                    answer = Answer(name, key, response.status_code, response.json(),
                                    time.perf_counter() - sent)
                except (httpx.HTTPError, ValueError) as exc:
                    answer = Answer(name, key, None, {}, time.perf_counter() - sent,
                                    error=f"{type(exc).__name__}: {exc}")
                with lock:
                    run.answers.append(answer)
                    run.bytes_sent += len(body)
                    progress.update()

    threads = [threading.Thread(target=node, args=(i, name)) for i, name in enumerate(nodes)]
    server, client, (busy, total) = children_cpu(), time.process_time(), machine_busy()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run.seconds = time.perf_counter() - started[0]
    run.server_cpu, run.client_cpu = children_cpu() - server, time.process_time() - client
    after_busy, after_total = machine_busy()
    run.machine_busy = (after_busy - busy) / (after_total - total)
    progress.close()
    return run


def warm_up(setup: FederationSetup, url: str, payload: bytes, key: str) -> None:
    """One upload to a fresh API process, so that the burst does not time its start-up
    (the model's shapes are built and the first update decoded on the first upload)."""
    name = min(setup.tokens)
    response = httpx.post(f"{url}{UPLOAD_PATH}", content=payload, timeout=300, headers={
        "Authorization": f"Bearer {setup.tokens[name]}", "Idempotency-Key": key})
    if response.status_code != 202:
        raise SystemExit(f"warm-up upload refused: {response.status_code} {response.text}")


def check(run: Run, tag: str, engine: Engine, setup: FederationSetup, url: str,
          expected_uploads: int, uploads_so_far: int) -> list[str]:
    """What is wrong with the run's answers and records (empty: nothing).

    ``uploads_so_far`` counts every upload of the session, warm-ups included: all of them
    are pending and audited.
    """
    problems = []
    keys = {(a.node, a.key) for a in run.answers}
    if len(run.answers) != expected_uploads or len(keys) != expected_uploads:
        problems.append(f"{len(run.answers)} answers for {len(keys)} distinct uploads, "
                        f"{expected_uploads} sent")
    wrong = [a for a in run.answers if a.status != 202]
    if wrong:
        problems.append(f"{len(wrong)} uploads not accepted, e.g. {wrong[0]}")
    with Session(engine) as session:
        rows = session.execute(
            select(FedNode.name, FedUpdate.idempotency_key, FedUpdate.id, FedUpdate.state)
            .join(FedNode, FedNode.id == FedUpdate.node_id)
            .where(FedUpdate.idempotency_key.like(f"{tag}-%"))).all()
        told = {(a.node, a.key): a.body.get("id") for a in run.accepted}
        stored: dict[tuple[str, str], list[str]] = {}
        for name, key, update_id, state in rows:
            stored.setdefault((name, key), []).append(update_id)
            if state != UpdateState.PENDING:
                problems.append(f"update {update_id} is {state}, not pending")
        if any(len(ids) != 1 for ids in stored.values()):
            problems.append("an upload is recorded more than once")
        if {k: ids[0] for k, ids in stored.items()} != told:
            problems.append(f"{len(stored)} uploads recorded, {len(told)} accepted: the "
                            "recorded ids differ from those the nodes were told")
        deadline = time.monotonic() + 30  # the audit row is written after the answer
        while True:
            audited = session.scalar(select(func.count()).select_from(FedAudit).where(
                FedAudit.method == "POST", FedAudit.path == UPLOAD_PATH))
            if audited == uploads_so_far or time.monotonic() > deadline:
                break
            time.sleep(0.5)
            session.expire_all()
        if audited != uploads_so_far:
            problems.append(f"{audited} audit rows for {uploads_so_far} uploads")
    status = httpx.get(f"{url}/v1/admin/status", timeout=60,
                       headers={"Authorization": f"Bearer {setup.admin_token}"}).json()
    pending = status["models"][0]["pending"]
    if pending != uploads_so_far:
        problems.append(f"admin status: {pending} pending, {uploads_so_far} accepted so far")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20, help="simulated nodes (threads)")
    parser.add_argument("--uploads-per-node", type=int, default=10,
                        help="updates each node uploads, one after the other")
    parser.add_argument("--rounds", type=int, default=1,
                        help="bursts per configuration (one API, then two, alternately)")
    parser.add_argument("--payloads", type=int, default=8,
                        help="different encoded updates, cycled through")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    base = bundled_model()
    payloads = [make_update(base, seed=i, num_samples=1 + i % 5)
                for i in tqdm(range(args.payloads), desc="encoding updates", unit="update")]
    work = Path(tempfile.mkdtemp(prefix="dafne-upload-"))
    runs: list[Run] = []
    problems: list[str] = []
    with temporary_schema("bench_upload") as schema:
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        setup = set_up(work, database_url=url, validation_sites="A", nodes=tuple(
            f"node-{n:02d}" for n in range(args.nodes)))
        engine = make_engine(url)
        expected = args.nodes * args.uploads_per_node
        uploaded = 0
        for round_ in range(args.rounds):
            for apis in (1, 2):
                tag = f"r{round_}-api{apis}"
                with contextlib.ExitStack() as stack:
                    urls = [stack.enter_context(start_api(setup)) for _ in range(apis)]
                    for i, api in enumerate(urls):
                        warm_up(setup, api, payloads[0], f"warmup-{tag}-{i}")
                    uploaded += apis
                    run = upload_burst(setup, urls, payloads, tag, args.uploads_per_node)
                    runs.append(run)
                    uploaded += expected
                    problems += [f"{tag}: {p}" for p in check(
                        run, tag, engine, setup, urls[0], expected, uploaded)]
        engine.dispose()
    print_table(args, runs, problems, len(payloads[0]), load)
    if args.json:
        args.json.write_text(json.dumps({"runs": [r.figures() for r in runs],
                                         "problems": problems}, indent=2))
    if problems:
        raise SystemExit("checks failed:\n" + "\n".join(problems))


def print_table(args: argparse.Namespace, runs: list[Run], problems: list[str],
                size: int, load: float) -> None:
    print(f"\n{args.nodes} nodes x {args.uploads_per_node} uploads at once "
          f"({size / 1e6:.2f} MB each), PostgreSQL, no worker, {os.cpu_count()} CPUs "
          f"(load average at the start: {load:.1f})\n")
    print("| API processes | round | uploads | wall (s) | updates/s | MB/s | p50 latency (s) "
          "| p95 latency (s) | max (s) | API CPU per update (ms) | client CPU per update (ms) "
          "| machine busy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for index, run in enumerate(runs):
        f = run.figures()
        print(f"| {run.apis} | {index // 2 + 1} | {f['accepted']}/{f['uploads']} | "
              f"{f['seconds']:.1f} | {f['updates_per_s']:.1f} | {f['mb_per_s']:.1f} | "
              f"{f['p50_s']:.2f} | {f['p95_s']:.2f} | {f['max_s']:.2f} | "
              f"{f['server_cpu_ms_per_update']:.0f} | {f['client_cpu_ms_per_update']:.0f} | "
              f"{100 * f['machine_busy']:.0f} % |")
    one = statistics.median(r.figures()["updates_per_s"] for r in runs if r.apis == 1)
    two = statistics.median(r.figures()["updates_per_s"] for r in runs if r.apis == 2)
    print(f"\ntwo API processes / one: **{two / one:.2f}x** updates/s")
    print("checks: " + ("every upload answered once (202), recorded once with the id it was "
                        "told, pending; one audit row each; admin status agrees"
                        if not problems else f"{len(problems)} FAILED (below)"))
    print(f"\ncommand: .venv/bin/python "
          f"{shlex.join(['bench/upload_throughput.py', *sys.argv[1:]])}")


if __name__ == "__main__":
    main()
