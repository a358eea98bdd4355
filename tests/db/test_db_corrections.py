"""The corrections table and the training queue on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import Engine, select

from dafne_node.config import load_config
from dafne_node.learning.training import schedule_training
from db import corrections
from db.base import utcnow
from db.jobs import active_job, enqueue_job
from db.node_models import Correction, CorrectionState, Job, JobKind, JobState, Series
from db.repository import index_instances
from db.session import make_session_factory, session_scope
from tests.db.records import record

ALWAYS = load_config(environ={"DAFNE_TRAINING__WINDOWS": '[{"cron": "* * * * *", '
                                                         '"max_duration_h": 24}]',
                              "DAFNE_TRAINING__MIN_NEW_EXAMPLES": "1"})


def _series(engine: Engine) -> int:
    with session_scope(engine) as session:
        index_instances(session, [record(1)])
        return session.scalars(select(Series.id)).one()


def _queued(session: object, series_id: int, uid: str) -> Correction:
    made = corrections.record(session, seg_sop_instance_uid=uid, state=CorrectionState.QUEUED,
                              source_series_id=series_id, example_path=f"examples/{uid}.npz",
                              labels=["soleus"], dice={"soleus": 0.5})
    assert made is not None
    return made


def test_recording_is_idempotent_and_newer_corrections_supersede(engine: Engine) -> None:
    series_id = _series(engine)
    with session_scope(engine) as session:
        first = _queued(session, series_id, "1.2.9.1")
        assert corrections.record(session, seg_sop_instance_uid="1.2.9.1",
                                  state=CorrectionState.REJECTED) is None
        second = _queued(session, series_id, "1.2.9.2")
        assert corrections.supersede_older(session, second) == [first]
        assert (first.state, first.superseded_by_id) == (CorrectionState.SUPERSEDED, second.id)
        with pytest.raises(ValueError, match="cannot go from superseded to trained"):
            corrections.move(first, CorrectionState.TRAINED)
        counts = corrections.correction_counts(session)
    assert counts["queued"] == 1 and counts["superseded"] == 1 and counts["rejected"] == 0
    with session_scope(engine) as session:
        assert [c.seg_sop_instance_uid for c in corrections.list_corrections(
            session, states=[CorrectionState.QUEUED])] == ["1.2.9.2"]


def test_new_examples_are_those_since_the_last_run(engine: Engine) -> None:
    series_id = _series(engine)
    with session_scope(engine) as session:
        _queued(session, series_id, "1.2.9.1")
        assert corrections.new_example_count(session) == (1, 1)
        enqueue_job(session, kind=JobKind.TRAIN, payload={"max_correction_id": 1})
        assert corrections.new_example_count(session) == (0, 1)
        _queued(session, series_id, "1.2.9.2")
        assert corrections.new_example_count(session)[0] == 1


def test_two_schedulers_at_once_queue_one_run(engine: Engine) -> None:
    """The row lock serialises the decision: the second sees the first's run, not none."""
    series_id = _series(engine)
    with session_scope(engine) as session:
        _queued(session, series_id, "1.2.9.1")
    sessions = make_session_factory(engine)
    results: list[Job | None] = []
    inside = threading.Event()

    def second() -> None:
        inside.wait(10)
        with sessions() as session, session.begin():
            results.append(schedule_training(session, ALWAYS, utcnow()))

    thread = threading.Thread(target=second)
    thread.start()
    with sessions() as session, session.begin():
        results.append(schedule_training(session, ALWAYS, utcnow()))
        inside.set()
        time.sleep(0.5)  # the second scheduler waits on the lock meanwhile
    thread.join(30)
    assert sum(job is not None for job in results) == 1, results
    with session_scope(engine) as session:
        job = active_job(session, JobKind.TRAIN)
        assert job is not None and job.state == JobState.QUEUED
        assert len(session.scalars(select(Job).where(Job.kind == JobKind.TRAIN)).all()) == 1
