"""The job life cycle: one table of allowed changes, and nothing else writes a job's state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dafne_node.jobs import IllegalTransitionError, lifecycle
from db import jobs as db_jobs
from db.node_models import JOB_TRANSITIONS, Job, JobKind, JobState

ROOT = Path(__file__).resolve().parents[2]
STATE_WRITE = re.compile(
    r"\bjob\.state\s*=(?!=)|\.state\s*=\s*JobState|state\s*=\s*(JobState|CLAIM|TAKE_OVER)"
    r"|[\"']state[\"']\s*:\s*JobState"
)
WRITERS = {"dafne_node/jobs/lifecycle.py", "db/jobs.py"}


def test_every_state_has_its_exits_and_final_states_have_none() -> None:
    assert set(JOB_TRANSITIONS) == set(JobState)
    assert JOB_TRANSITIONS[JobState.DONE] == JOB_TRANSITIONS[JobState.SKIPPED] == frozenset()
    assert db_jobs.CLAIM[1] in JOB_TRANSITIONS[db_jobs.CLAIM[0]]
    assert db_jobs.TAKE_OVER[1] in JOB_TRANSITIONS[db_jobs.TAKE_OVER[0]]


def test_no_other_module_writes_job_state() -> None:
    writers = set()
    for path in [*ROOT.glob("dafne_node/**/*.py"), *ROOT.glob("db/**/*.py"),
                 *ROOT.glob("dicom_scp/**/*.py"), *ROOT.glob("federation/**/*.py")]:
        if STATE_WRITE.search(path.read_text()):
            writers.add(str(path.relative_to(ROOT)))
    assert writers <= WRITERS, f"job state written outside the life cycle: {writers - WRITERS}"
    assert "dafne_node/jobs/lifecycle.py" in writers  # the pattern still finds the real ones


@pytest.mark.parametrize(("start", "change"), [
    (JobState.DONE, lifecycle.fail),
    (JobState.SKIPPED, lifecycle.finish),
    (JobState.QUEUED, lifecycle.start_sending),
    (JobState.FAILED, lifecycle.finish),
])
def test_illegal_change_is_refused_naming_both_states(start: JobState, change: object) -> None:
    job = Job(id=7, kind=JobKind.SEGMENT, state=start)
    with pytest.raises(IllegalTransitionError, match=f"from {start.value} to"):
        if change in (lifecycle.fail,):
            lifecycle.fail(job, "x")
        else:
            change(job)  # type: ignore[operator]
    assert job.state == start


def test_fail_keeps_one_line_and_a_finish_time() -> None:
    job = Job(id=8, kind=JobKind.SEGMENT, state=JobState.RUNNING)
    lifecycle.fail(job, "decoder said:\n  frame 3\tis short")
    assert job.state == JobState.FAILED
    assert job.error == "decoder said: frame 3 is short"
    assert job.finished_at is not None

