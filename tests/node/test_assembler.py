"""Series assembly: quiet period, routing to jobs, skips with reasons, late instances."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import MRImageStorage, SegmentationStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import load_config
from dafne_node.inference.assemble import SeriesAssembler
from db.base import utcnow
from db.migrate import upgrade
from db.node_models import Job, JobKind, JobState, Series, SeriesState
from db.repository import index_instances
from db.session import make_engine, make_session_factory
from dicom_scp.store import ReceivedInstance

QUIET = 10.0


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(tmp_path / "node.db")
    upgrade(engine)
    return make_session_factory(engine)


def receive(sessions: sessionmaker[Session], series_uid: str, count: int, *,
            sop_class: str = MRImageStorage, modality: str = "MR", start: int = 0,
            ago: float = 60.0) -> None:
    at = utcnow() - timedelta(seconds=ago)
    records = [
        ReceivedInstance(
            sop_instance_uid=f"{series_uid}.{n}", sop_class_uid=sop_class,
            transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid="1.2.3",
            series_instance_uid=series_uid, spool_path=f"s/{series_uid}/{n}.dcm",
            size_bytes=1000, received_at=at, calling_ae="ORTHANC", modality=modality,
            series_description="T1 axial calf", body_part_examined="LEG",
        )
        for n in range(start, start + count)
    ]
    with sessions() as session, session.begin():
        index_instances(session.connection(), records)


def assembler(sessions: sessionmaker[Session], **overrides: object) -> SeriesAssembler:
    config = load_config(environ={}, overrides={
        ("assembly", "quiet_period_s"): QUIET,
        **{tuple(key.split(".")): value for key, value in overrides.items()},
    })
    return SeriesAssembler(sessions, config)


def jobs(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_series_waits_for_the_quiet_period(sessions: sessionmaker[Session]) -> None:
    receive(sessions, "1.2.3.1", 5, ago=2.0)
    assert assembler(sessions, default_destination=None).run_once() == 0
    assert jobs(sessions) == []


def test_quiet_mr_series_becomes_one_segment_job(sessions: sessionmaker[Session],
                                                 tmp_path: Path) -> None:
    receive(sessions, "1.2.3.1", 5)
    config_file = tmp_path / "node.toml"
    config_file.write_text('default_destination = "pacs"\n[[destinations]]\nname = "pacs"\n'
                           'ae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n')
    config = load_config(config_file, environ={})
    first = SeriesAssembler(sessions, config)
    assert first.run_once() == 1
    assert first.run_once() == 0  # routed once
    [job] = jobs(sessions)
    assert (job.kind, job.state, job.series_revision) == (JobKind.SEGMENT, JobState.QUEUED, 0)
    assert job.payload == {"route": "default", "destinations": ["pacs"]}


def test_unroutable_series_is_skipped_with_the_reason(sessions: sessionmaker[Session]) -> None:
    receive(sessions, "1.2.3.2", 3)
    assembler(sessions).run_once()
    with sessions() as session:
        series = session.scalars(select(Series)).one()
    assert series.state == SeriesState.SKIPPED
    assert "no default destination" in (series.state_reason or "")
    assert jobs(sessions) == []


def test_incoming_seg_is_kept_for_corrections(sessions: sessionmaker[Session]) -> None:
    receive(sessions, "1.2.3.3", 1, sop_class=SegmentationStorage, modality="SEG")
    assembler(sessions).run_once()
    [job] = jobs(sessions)
    assert job.kind == JobKind.CORRECTION
    with sessions() as session:
        assert "correction handling" in (session.scalars(select(Series)).one().state_reason or "")


def test_late_instance_starts_a_superseding_job(sessions: sessionmaker[Session],
                                                tmp_path: Path) -> None:
    config_file = tmp_path / "node.toml"
    config_file.write_text('default_destination = "pacs"\n[[destinations]]\nname = "pacs"\n'
                           'ae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n')
    node = SeriesAssembler(sessions, load_config(config_file, environ={}))
    receive(sessions, "1.2.3.4", 4)
    node.run_once()
    receive(sessions, "1.2.3.4", 1, start=4, ago=30.0)
    node.run_once()
    first, second = jobs(sessions)
    assert (first.series_revision, second.series_revision) == (0, 1)
    assert second.supersedes_id == first.id
