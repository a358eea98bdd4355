"""Delivery: back-off between attempts, a visible failure after the last one, retry by command."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.app.cli import main
from dafne_node.config import NodeConfig, load_config
from dafne_node.inference.deliver import OutboxSender, backoff
from db.base import utcnow
from db.migrate import upgrade
from db.node_models import Job, JobKind, JobState, OutboxItem, OutboxState
from db.session import make_engine, make_session_factory
from dicom_scp.sender import AssociationError, Destination, SendResult

MAX_ATTEMPTS = 3


class FlakyPacs:
    """Stands in for the C-STORE SCU: unreachable until ``up`` is set."""

    def __init__(self) -> None:
        self.up = False
        self.calls: list[list[Path]] = []

    def __call__(self, paths: list[Path], destination: Destination, *, calling_ae: str
                 ) -> list[SendResult]:
        self.calls.append(paths)
        if not self.up:
            raise AssociationError(f"{destination}: connection refused")
        return [SendResult(path, "1.2.3.9", 0x0000) for path in paths]


@pytest.fixture
def node(tmp_path: Path) -> tuple[NodeConfig, sessionmaker[Session]]:
    config = load_config(environ={}, overrides={
        ("node", "data_dir"): tmp_path / "data",
        ("sending", "max_attempts"): MAX_ATTEMPTS,
        ("sending", "backoff_initial_s"): 2.0,
        ("sending", "backoff_max_s"): 3.0,
    })
    engine = make_engine(config.database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        job = Job(kind=JobKind.SEGMENT, state=JobState.SENDING, result_sop_instance_uid="1.2.3.9",
                  payload={})
        session.add(job)
        session.flush()
        session.add(OutboxItem(job_id=job.id, destination="pacs", ae_title="PACS",
                               host="127.0.0.1", port=4242, path=str(tmp_path / "seg.dcm"),
                               sop_instance_uid="1.2.3.9"))
    return config, sessions


def item_and_job(sessions: sessionmaker[Session]) -> tuple[OutboxItem, Job]:
    with sessions() as session:
        return session.scalars(select(OutboxItem)).one(), session.scalars(select(Job)).one()


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n, 2.0, 20.0).total_seconds() for n in range(1, 6)] == [2, 4, 8, 16, 20]


def test_failed_delivery_backs_off_fails_visibly_and_is_retried_by_command(
    node: tuple[NodeConfig, sessionmaker[Session]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, sessions = node
    pacs = FlakyPacs()
    sender = OutboxSender(sessions, config, "test-worker", send=pacs)

    before = utcnow()  # clock reads, not elapsed time: a busy machine may take seconds here
    assert sender.run_once() == 1
    item, job = item_and_job(sessions)
    assert (item.state, item.attempts) == (OutboxState.PENDING, 1)
    assert "connection refused" in (item.last_error or "")
    assert item.next_attempt_at >= before + timedelta(seconds=2)  # backoff_initial_s
    assert sender.run_once(now=before + timedelta(seconds=1)) == 0, \
        "not due yet: the back-off must be respected"

    later = utcnow()
    for _ in range(MAX_ATTEMPTS - 1):
        later += timedelta(seconds=10)
        assert sender.run_once(now=later) == 1
    item, job = item_and_job(sessions)
    assert item.state == OutboxState.FAILED
    assert job.state == JobState.FAILED
    assert "connection refused" in (job.error or "")

    assert main(["jobs", "retry", str(job.id), "--data-dir", str(config.node.data_dir)]) == 0
    assert f"job {job.id}: sending" in capsys.readouterr().out
    pacs.up = True
    assert sender.run_once() == 1
    item, job = item_and_job(sessions)
    assert (item.state, job.state) == (OutboxState.SENT, JobState.DONE)
    assert main(["jobs", "retry", str(job.id), "--data-dir", str(config.node.data_dir)]) == 1
    assert "only failed jobs can be retried" in capsys.readouterr().err


@pytest.mark.parametrize(("status", "permanent"), [
    (0xA900, True),   # Data Set does not match SOP Class
    (0xC000, True),   # Cannot understand
    (0x0122, True),   # SOP Class not supported
    (0xA700, False),  # Out of resources: PACS may free space
    (0x0110, False),  # Processing failure
])
def test_refusal_a_resend_cannot_change_fails_at_once(
    node: tuple[NodeConfig, sessionmaker[Session]], status: int, permanent: bool
) -> None:
    config, sessions = node

    def refusing_pacs(paths: list[Path], destination: Destination, *, calling_ae: str
                      ) -> list[SendResult]:
        return [SendResult(path, "1.2.3.9", status, "refused by test PACS") for path in paths]

    assert OutboxSender(sessions, config, "test-worker", send=refusing_pacs).run_once() == 1
    item, job = item_and_job(sessions)
    assert item.attempts == 1 and item.last_status == status
    if permanent:
        assert (item.state, job.state) == (OutboxState.FAILED, JobState.FAILED)
        assert "refused by test PACS" in (job.error or "")
    else:
        assert (item.state, job.state) == (OutboxState.PENDING, JobState.SENDING)
