"""Two node processes share one PostgreSQL database and never process a job twice.

``dafne-node serve`` receives six series; a second process, ``dafne-node worker``, shares its
PostgreSQL schema and data folder. Both claim segmentation jobs (``FOR UPDATE SKIP LOCKED``).
Every series must get exactly one SEG, each job run once, and both processes must have worked.
Everything listens on 127.0.0.1 only; the SEG destination is a Storage SCP in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dafne_node.phantom import make_study
from dafne_node.phantom.study import write_study
from db.node_models import Job, JobKind, JobState
from db.session import make_engine
from dicom_scp.receiver import StorageServer
from dicom_scp.sender import AssociationError, echo, send_files
from dicom_scp.spool import Spool
from tests.dicom_scp.helpers import MemoryIndex
from tests.postgres import PG_URL, temporary_schema

pytestmark = pytest.mark.postgres

DAFNE_NODE = str(Path(sys.executable).with_name("dafne-node"))
SERIES = 6
NODE_PORT = 11790


@pytest.fixture
def pg_schema() -> Iterator[str]:
    with temporary_schema("t_workers") as schema:
        yield schema


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([DAFNE_NODE, "--log-level", "info", *command], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _done_jobs(engine: Engine) -> list[Job]:
    with Session(engine) as session:
        return list(session.scalars(select(Job).where(Job.kind == JobKind.SEGMENT)))


def test_two_workers_share_the_jobs(pg_schema: str, tmp_path: Path) -> None:
    destination_index = MemoryIndex()  # counts every C-STORE, duplicates included
    destination = StorageServer(ae_title="PACS", host="127.0.0.1", port=0,
                                spool=Spool(tmp_path / "pacs"), index=destination_index)
    destination.start()
    data = tmp_path / "node"
    env = {
        **os.environ,
        "DAFNE_DB_URL": f"{PG_URL}?options=-csearch_path%3D{pg_schema}",
        "DAFNE_DATA_DIR": str(data),
        "DAFNE_DICOM__BIND": "127.0.0.1",
        "DAFNE_PORT": str(NODE_PORT),
        "DAFNE_HTTP_PORT": "18765",
        "DAFNE_QUIET_PERIOD": "3",  # at 1 s a busy 2-core machine split a series in two
        "DAFNE_DICOM__MIN_FREE_DISK_MB": "0",
    }
    logs = [tmp_path / "serve.log", tmp_path / "worker.log"]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        config = tmp_path / "node.toml"
        config.write_text(f'default_destination = "pacs"\n[[destinations]]\nname = "pacs"\n'
                          f'ae_title = "PACS"\nhost = "127.0.0.1"\nport = {destination.port}\n')
        processes.append(_start(["serve", "--config", str(config)], env, logs[0]))
        processes.append(_start(["worker", "--config", str(config)], env, logs[1]))
        studies = [make_study(site="A", seed=100 + n, slices=24, matrix=128)
                   for n in range(SERIES)]
        folders = [write_study(study, tmp_path / f"study{n}").images
                   for n, study in enumerate(studies)]
        _wait_until_listening(NODE_PORT, logs[0])
        _wait_until_started(logs[1])
        for images in folders:
            results = send_files(images, f"DAFNE@127.0.0.1:{NODE_PORT}", calling_ae="MODALITY")
            assert all(result.ok for result in results)
        engine = make_engine(PG_URL, schema=pg_schema)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            jobs = _done_jobs(engine)
            if len(jobs) == SERIES and all(job.state == JobState.DONE for job in jobs):
                break
            time.sleep(0.5)
        time.sleep(2)  # a duplicate delivery would show up now
        jobs = _done_jobs(engine)
        engine.dispose()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
        destination.stop()

    assert [job.state for job in jobs] == [JobState.DONE] * SERIES, [
        (job.id, job.state, job.error) for job in jobs]
    assert all(job.attempts == 1 for job in jobs)
    workers = {job.claimed_by for job in jobs}
    assert len(workers) == 2, (workers, logs[1].read_text()[-2000:])
    assert sum(destination_index.batches) == SERIES
    assert len(destination_index.records) == SERIES


def _wait_until_started(log: Path) -> None:
    """Both processes must be ready before the series arrive, or one could take every job."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if " started (model " in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError("worker did not start: " + log.read_text()[-3000:])


def _wait_until_listening(port: int, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if echo(f"DAFNE@127.0.0.1:{port}", timeout=2) == 0:
                return
        except AssociationError:
            time.sleep(0.5)
    raise AssertionError("node did not start: " + log.read_text()[-3000:])
