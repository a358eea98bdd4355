"""Jobs: every change of a job's state, for every kind of job, in one place.

See :mod:`dafne_node.jobs.lifecycle`; the table of allowed changes is
``db.node_models.JOB_TRANSITIONS``.
"""

from dafne_node.jobs.lifecycle import (
    IllegalTransitionError,
    JobError,
    fail,
    finish,
    requeue,
    retry_job,
    skip,
    start_sending,
)

__all__ = [
    "IllegalTransitionError",
    "JobError",
    "fail",
    "finish",
    "requeue",
    "retry_job",
    "skip",
    "start_sending",
]
