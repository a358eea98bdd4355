"""The segmentation worker: one SEG per series revision, idempotent re-runs, missing files."""

from __future__ import annotations

from datetime import timedelta

from pydicom import dcmread
from sqlalchemy import select, update

from dafne_node.inference.assemble import SeriesAssembler
from dafne_node.inference.segmenter import SeriesSegmenter
from db.base import utcnow
from db.node_models import Job, JobState, OutboxItem, Series, SeriesState
from tests.conftest import WrittenStudy
from tests.node.conftest import Node, segment_runner


def test_job_writes_one_seg_and_queues_its_delivery(
    node: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy,
) -> None:
    _config, sessions = node
    worker = segment_runner(node, segmenter)
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
    node: Node, segmenter: SeriesSegmenter,
) -> None:
    config, _sessions = node
    lost = sorted(config.spool_dir.rglob("*.dcm"))[0]
    lost.unlink()
    done = segment_runner(node, segmenter).run_once()
    assert done is not None
    referenced = dcmread(done.seg_path).ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert len(referenced) == 11  # the 12-slice series less the lost file


def test_a_new_revision_supersedes_the_seg_in_the_same_series(
    node: Node, segmenter: SeriesSegmenter,
) -> None:
    config, sessions = node
    worker = segment_runner(node, segmenter)
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
