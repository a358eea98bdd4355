"""The segmentation worker: one SEG per series revision, idempotent re-runs, missing files."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.assembler import SeriesAssembler
from dafne_node.config import NodeConfig, load_config
from dafne_node.segmentation import SeriesSegmenter
from dafne_node.worker import SegmentationWorker
from db.base import utcnow
from db.migrate import upgrade
from db.node_models import Job, JobState, OutboxItem, Series, SeriesState
from db.repository import index_instances
from db.session import make_engine, make_session_factory
from dicom_scp.store import ReceivedInstance
from tests.conftest import WrittenStudy


@pytest.fixture(scope="module")
def segmenter() -> SeriesSegmenter:
    return SeriesSegmenter()


@pytest.fixture
def node(tmp_path: Path, small_study: WrittenStudy) -> tuple[NodeConfig, sessionmaker[Session]]:
    """A node database and spool holding the small phantom series, received a minute ago."""
    toml = tmp_path / "node.toml"
    toml.write_text('default_destination = "pacs"\n[[destinations]]\nname = "pacs"\n'
                    'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n')
    config = load_config(toml, environ={}, overrides={("node", "data_dir"): tmp_path / "data"})
    engine = make_engine(config.database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    study = small_study.study
    records = []
    for path, sop_uid in zip(small_study.files.images, study.sop_instance_uids, strict=True):
        relative = f"{study.study_instance_uid}/{study.series_instance_uid}/{sop_uid}.dcm"
        (config.spool_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, config.spool_dir / relative)
        records.append(ReceivedInstance(
            sop_instance_uid=sop_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            study_instance_uid=study.study_instance_uid,
            series_instance_uid=study.series_instance_uid, spool_path=relative,
            size_bytes=path.stat().st_size, received_at=utcnow() - timedelta(minutes=1),
            calling_ae="ORTHANC", modality="MR"))
    with sessions() as session, session.begin():
        index_instances(session.connection(), records)
    SeriesAssembler(sessions, config).run_once()
    return config, sessions


def test_job_writes_one_seg_and_queues_its_delivery(
    node: tuple[NodeConfig, sessionmaker[Session]], segmenter: SeriesSegmenter,
    small_study: WrittenStudy,
) -> None:
    config, sessions = node
    worker = SegmentationWorker(sessions, config, segmenter, "w1")
    done = worker.run_once()
    assert done is not None and done.seg_path.exists()
    seg = dcmread(done.seg_path)
    assert seg.StudyInstanceUID == small_study.study.study_instance_uid
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        [item] = session.scalars(select(OutboxItem)).all()
    assert job.state == JobState.SENDING
    assert job.result is not None and set(job.result["volumes_ml"]) <= {
        "soleus", "gastrocnemius_medial", "gastrocnemius_lateral", "tibialis_anterior",
        "extensor_digitorum_longus", "peroneus"}
    assert (item.ae_title, item.port, item.sop_instance_uid) == ("PACS", 4242,
                                                                 seg.SOPInstanceUID)

    # A worker killed after writing: the job runs again and produces the very same SEG,
    # and its delivery is not queued twice.
    with sessions() as session, session.begin():
        session.execute(update(Job).values(state=JobState.QUEUED, claimed_by=None))
    again = worker.run_once()
    assert again is not None and again.sop_instance_uid == seg.SOPInstanceUID
    with sessions() as session:
        assert len(session.scalars(select(OutboxItem)).all()) == 1


def test_missing_spool_files_are_left_out_not_fatal(
    node: tuple[NodeConfig, sessionmaker[Session]], segmenter: SeriesSegmenter,
) -> None:
    config, sessions = node
    lost = sorted(config.spool_dir.rglob("*.dcm"))[0]
    lost.unlink()
    done = SegmentationWorker(sessions, config, segmenter, "w1").run_once()
    assert done is not None
    referenced = dcmread(done.seg_path).ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert len(referenced) == 11  # the 12-slice series less the lost file


def test_a_new_revision_supersedes_the_seg_in_the_same_series(
    node: tuple[NodeConfig, sessionmaker[Session]], segmenter: SeriesSegmenter,
) -> None:
    config, sessions = node
    worker = SegmentationWorker(sessions, config, segmenter, "w1")
    first = worker.run_once()
    assert first is not None
    # A late instance reopened the series (the index does this): revision 1, quiet again.
    with sessions() as session, session.begin():
        session.execute(update(Series).values(
            state=SeriesState.RECEIVING, revision=1,
            last_received_at=utcnow() - timedelta(minutes=1)))
    SeriesAssembler(sessions, config).run_once()
    second = worker.run_once()
    assert second is not None
    old, new = dcmread(first.seg_path), dcmread(second.seg_path)
    assert new.SeriesInstanceUID == old.SeriesInstanceUID
    assert new.SOPInstanceUID != old.SOPInstanceUID
    assert (int(old.InstanceNumber), int(new.InstanceNumber)) == (1, 2)
    with sessions() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
        items = session.scalars(select(OutboxItem)).all()
    assert jobs[first.job_id].state == JobState.SKIPPED
    assert "superseded" in (jobs[first.job_id].error or "")
    assert [item.state.value for item in items if item.job_id == first.job_id] == ["cancelled"]
    assert [item.state.value for item in items if item.job_id == second.job_id] == ["pending"]
