"""Train jobs: when a window is open and enough corrections wait, fine-tune the node's model.

Two parts, both run by the trainer process (``dafne-node trainer``, never the process that
segments: torch's thread pool is per process and training must not retune inference):

* :func:`schedule_training` — on each tick, if a training window is open, no training is
  queued or running, and at least ``training.min_new_examples`` examples arrived since the
  last run, queue one ``train`` job. Under a row lock, so two trainer processes on one
  database never queue two runs.
* :class:`TrainHandler` — the runner's handler for ``train``: it picks the examples (new
  ones, a replay sample of trained ones, the held-out ones for the gate), fine-tunes from
  the active model (:func:`dafne_node.learning.finetune.finetune`), and records the outcome.
  It yields to segmentation between steps, heart-beats its job, and stops at a step when
  the window closes (or on SIGTERM), keeping a checkpoint: the job waits, queued, for the
  next window and continues from there. An accepted run marks its examples trained,
  registers the new local model, queues its weight delta for the federation sync client
  (in the same transaction, when ``[federation]`` is configured) and, when
  ``training.activate_local_model`` is on, makes it the node's model. The delta is
  against the root generation the run's model descends from: the registered root of that
  generation (pulled from the federation, or the bundled or configured model).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import NodeConfig
from dafne_node.jobs import lifecycle
from dafne_node.jobs.runner import ClaimedJob, JobRunner, worker_identity
from dafne_node.learning.examples import ExampleStore
from dafne_node.learning.finetune import (
    FinetuneOutcome,
    FinetuneSettings,
    finetune,
    select_replay,
    split_holdout,
)
from dafne_node.learning.windows import next_opening, open_window
from dafne_node.model.manifest import default_model_dir, load_manifest
from dafne_node.model.train import TrainingExample
from dafne_node.model_registry import active_model, model_dir_name, register_active_model
from db import corrections as corrections_repository
from db.base import dialect_insert, utcnow
from db.corrections import new_example_count
from db.federation_sync import enqueue_upload
from db.jobs import active_job, claim_job, enqueue_job, heartbeat
from db.node_models import Correction, CorrectionState, Job, JobKind, JobState, Model, NodeState

__all__ = [
    "HEARTBEAT_EVERY_S",
    "TrainHandler",
    "finetune_settings",
    "run_now",
    "schedule_training",
]

LOGGER = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 10.0
"""How often a running training records that it is alive (the node takes over jobs whose
worker was silent for 90 s)."""

PAUSE_POLL_S = 0.5
"""How often a paused training looks whether segmentation is done."""

_LOCK_KEY = "training"
"""The ``node_state`` row locked while deciding to queue a run."""


def finetune_settings(config: NodeConfig) -> FinetuneSettings:
    """The fine-tuning settings of the node's ``[training]`` section."""
    training = config.training
    return FinetuneSettings(
        steps=training.steps, lr=training.learning_rate, contrast_fold=training.contrast_fold,
        max_dice_drop=training.max_dice_drop,
        holdout_fraction=training.holdout_fraction, replay_fraction=training.replay_fraction,
        seed=training.seed, threads=training.threads, compile=training.compile,
        checkpoint_every=training.checkpoint_every_steps,
    )


def schedule_training(session: Session, config: NodeConfig, now: datetime,
                      *, manual: bool = False) -> Job | None:
    """Queue a train job if one is due; return it, or None.

    Due means: a window is open (or ``manual``, IT's ``train --now``), no training is
    queued or running, and enough new examples wait (one, for a manual run).
    """
    if not manual and open_window(config.training.windows, now) is None:
        return None
    _lock(session)
    if active_job(session, JobKind.TRAIN) is not None:
        return None
    count, newest = new_example_count(session)
    wanted = 1 if manual else config.training.min_new_examples
    if count < wanted:
        LOGGER.debug("%d new example(s), %d needed: no training", count, wanted)
        return None
    job = enqueue_job(session, kind=JobKind.TRAIN,
                      payload={"max_correction_id": newest, "manual": manual,
                               "new_examples": count})
    LOGGER.info("training queued (job %s): %d new example(s)", job.id if job else "?", count)
    return job


def _lock(session: Session) -> None:
    session.execute(dialect_insert(session, NodeState).values(key=_LOCK_KEY, value={},
                                                              updated_at=utcnow())
                    .on_conflict_do_nothing(index_elements=["key"]))
    session.scalars(select(NodeState).where(NodeState.key == _LOCK_KEY).with_for_update()).one()


@dataclass(frozen=True)
class _Selection:
    new: list[Correction]
    replay: list[Correction]
    heldout: list[Correction]


class TrainHandler:
    """Runs train jobs (the runner's handler for ``train``) in the trainer process.

    Parameters
    ----------
    session_factory:
        Sessions on the node database.
    config:
        ``[training]``, the model and the data directory.
    stop:
        Set on SIGTERM: the run stops at the next step and keeps its checkpoint.
    windowed:
        Train only inside a window and stop at its end (the trainer process); off for
        IT's ``train --now``.
    clock:
        The current time (tests drive it).
    progress:
        Show a progress bar (``train --now`` in a terminal).
    """

    def __init__(self, session_factory: sessionmaker[Session], config: NodeConfig, *,
                 stop: threading.Event | None = None, windowed: bool = True,
                 clock: Callable[[], datetime] = utcnow, progress: bool = False) -> None:
        self._sessions = session_factory
        self._windowed = windowed
        self._config = config
        self._stop = stop or threading.Event()
        self._clock = clock
        self._progress = progress
        self._examples = ExampleStore(config.node.data_dir)

    def handle(self, claimed: ClaimedJob) -> FinetuneOutcome | None:
        """Run the training of ``claimed`` until it is done or its window closes."""
        with self._sessions() as session:
            job = session.get(Job, claimed.id)
            if job is None:
                return None
            payload = dict(job.payload)
            selection = self._select(session, int(payload.get("max_correction_id", 0)))
            session.expunge_all()
        closes_at = None
        if self._windowed:
            window = open_window(self._config.training.windows, self._clock())
            if window is None:
                self._pause(claimed, "no training window is open")
                return None
            closes_at = window.closes_at
        if not selection.new:
            self._finish(claimed, {"outcome": "nothing to train",
                                   "reason": "every new example is held out for the gate"},
                         trained=[])
            return None
        outcome = self._run(claimed, selection, closes_at)
        self._record(claimed, selection, outcome)
        return outcome

    def _select(self, session: Session, max_correction_id: int) -> _Selection:
        usable = list(session.scalars(
            select(Correction)
            .where(Correction.state.in_([CorrectionState.QUEUED, CorrectionState.TRAINED]),
                   Correction.example_path.is_not(None))
            .order_by(Correction.id)
        ))
        settings = finetune_settings(self._config)
        training_ids, heldout_ids = split_holdout(
            [c.id for c in usable], fraction=settings.holdout_fraction,
            min_examples=settings.holdout_min_examples)
        by_id = {c.id: c for c in usable}
        training = [by_id[i] for i in training_ids]
        new = [c for c in training if c.state == CorrectionState.QUEUED
               and (not max_correction_id or c.id <= max_correction_id)]
        pool = [c for c in training if c.state == CorrectionState.TRAINED]
        return _Selection(new=new, replay=select_replay(pool, len(new), settings),
                          heldout=[by_id[i] for i in heldout_ids])

    def _run(self, claimed: ClaimedJob, selection: _Selection,
             closes_at: datetime | None) -> FinetuneOutcome:
        with self._sessions() as session:
            active = active_model(session)
            if active is not None:
                base_dir, name, generation = Path(active.path), active.name, active.generation
            else:  # no node registered a model yet: the configured root
                root = load_manifest(self._root_dir)
                base_dir, name, generation = self._root_dir, root.name, root.generation
            latest_round = session.scalar(
                select(func.max(Model.local_round))
                .where(Model.name == name, Model.generation == generation)) or 0
            root_dir = self._root_of(session, name, generation)
        local_round = int(latest_round) + 1
        out_dir = self._config.node.data_dir / "models" / model_dir_name(name, generation,
                                                                         local_round)
        with _Heartbeat(self._sessions, claimed) as beat:

            def should_stop() -> bool:
                return self._stop.is_set() or beat.lost or self._window_closed(closes_at)

            def between_steps() -> None:
                while self._segmentation_waits() and not should_stop():
                    time.sleep(PAUSE_POLL_S)

            return finetune(
                base_dir, self._load(selection.new), self._load(selection.replay),
                self._load(selection.heldout), finetune_settings(self._config),
                out_dir=out_dir,
                checkpoint_dir=self._config.node.data_dir / "training" / "checkpoint",
                root_dir=root_dir if base_dir != root_dir else None,
                local_round=local_round, should_stop=should_stop, between_steps=between_steps,
                progress=self._progress,
            )

    def _window_closed(self, closes_at: datetime | None) -> bool:
        return closes_at is not None and self._clock() >= closes_at

    @property
    def _root_dir(self) -> Path:
        return self._config.model.dir or default_model_dir()

    def _root_of(self, session: Session, name: str, generation: int) -> Path:
        """The root generation a model of ``name`` and ``generation`` descends from.

        The delta must be against the weights the federation has for that generation: the
        registered root (a generation pulled from the federation, or the configured or
        bundled model), else the configured one as before anything was registered.
        """
        path = session.scalar(select(Model.path).where(
            Model.name == name, Model.generation == generation, Model.local_round == 0))
        return Path(path) if path is not None else self._root_dir

    def _load(self, corrections: list[Correction]) -> list[TrainingExample]:
        return [self._examples.load(c.example_path).example for c in corrections
                if c.example_path is not None]

    def _segmentation_waits(self) -> bool:
        with self._sessions() as session:
            return session.scalar(
                select(Job.id).where(
                    Job.kind == JobKind.SEGMENT,
                    or_(Job.state == JobState.RUNNING,
                        (Job.state == JobState.QUEUED)
                        & or_(Job.not_before.is_(None), Job.not_before <= utcnow())))
                .limit(1)) is not None

    def _record(self, claimed: ClaimedJob, selection: _Selection,
                outcome: FinetuneOutcome) -> None:
        summary = {"outcome": outcome.status, **outcome.to_json(),
                   "examples": [c.id for c in selection.new],
                   "replayed": [c.id for c in selection.replay],
                   "heldout": [c.id for c in selection.heldout]}
        if outcome.status == "interrupted":
            # Stopped by the window's end: wait for the next one. Stopped by SIGTERM: the
            # next trainer continues at once if the window is still open.
            window = open_window(self._config.training.windows, self._clock())
            upcoming = None if window else next_opening(self._config.training.windows,
                                                        self._clock())
            self._pause(claimed, outcome.reason,
                        not_before=upcoming.opened_at if upcoming else None)
            return
        trained = [c.id for c in selection.new] if outcome.accepted else []
        self._finish(claimed, summary, trained=trained, outcome=outcome)

    def _pause(self, claimed: ClaimedJob, reason: str, *,
               not_before: datetime | None = None) -> None:
        with self._sessions() as session, session.begin():
            job = session.get(Job, claimed.id, with_for_update=True)
            if _still_ours(job, claimed):
                lifecycle.pause(job, reason, not_before=not_before)

    def _finish(self, claimed: ClaimedJob, summary: dict[str, Any], *, trained: list[int],
                outcome: FinetuneOutcome | None = None) -> None:
        with self._sessions() as session, session.begin():
            job = session.get(Job, claimed.id, with_for_update=True)
            if not _still_ours(job, claimed):
                LOGGER.warning("train job %d was taken from this trainer; outcome dropped",
                               claimed.id)
                return
            assert job is not None
            for correction in session.scalars(select(Correction).where(
                    Correction.id.in_(trained)).with_for_update()):
                if correction.state == CorrectionState.QUEUED:
                    corrections_repository.move(correction, CorrectionState.TRAINED)
                    correction.trained_job_id = job.id
            if outcome is not None and outcome.accepted and outcome.model_dir is not None:
                self._register(session, outcome)
            job.result = summary
            lifecycle.finish(job)
        LOGGER.info("training job %d: %s: %s", claimed.id, summary["outcome"],
                    summary.get("reason", ""), extra={"job_id": claimed.id})

    def _register(self, session: Session, outcome: FinetuneOutcome) -> None:
        assert outcome.model_dir is not None
        manifest = load_manifest(outcome.model_dir)
        register_active_model(
            session, name=manifest.name, generation=manifest.generation,
            local_round=manifest.local_round or 0, path=str(outcome.model_dir),
            sha256=manifest.weights.sha256, source="local",
            manifest=manifest.model_dump(mode="json"),
            activate=self._config.training.activate_local_model,
        )
        if self._config.federation.enabled and outcome.delta_path is not None:
            upload = enqueue_upload(session, delta_path=outcome.delta_path,
                                    base_generation=manifest.generation,
                                    local_round=manifest.local_round or 0)
            LOGGER.info("weight delta of %s queued for the federation (upload %d)",
                        manifest.version_label, upload.id)


class _Heartbeat:
    """Records every :data:`HEARTBEAT_EVERY_S`, from its own thread, that the job is alive.

    Why a thread and not a beat between steps: one step can outlast the node's take-over
    limit. The first step of a compiled run compiles the network (150-170 s with eight
    nodes compiling on two cores in the multi-hospital run), so the node took the job over
    mid-compile and the run started again from its checkpoint, compiling again (and on a
    shared PostgreSQL, another node's trainer could claim it meanwhile). Like the node's
    own jobs, a training job is alive while its process is. ``lost`` tells the run, at its
    next step, that another process took the job after all (this one was silent too long):
    stop.
    """

    def __init__(self, sessions: sessionmaker[Session], claimed: ClaimedJob) -> None:
        self._sessions = sessions
        self._claimed = claimed
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"train-job-{claimed.id}-heartbeat")
        self.lost = False

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_EVERY_S):
            try:
                with self._sessions() as session, session.begin():
                    ours = heartbeat(session, self._claimed.id, self._claimed.worker_id)
            except SQLAlchemyError:  # a database blip: the next beat tries again
                LOGGER.exception("train job %d: could not record its heartbeat",
                                 self._claimed.id)
                continue
            if not ours:
                LOGGER.warning("train job %d is no longer this trainer's", self._claimed.id)
                self.lost = True
                return


def _still_ours(job: Job | None, claimed: ClaimedJob) -> bool:
    return job is not None and job.state == JobState.RUNNING \
        and job.claimed_by == claimed.worker_id


def run_now(session_factory: sessionmaker[Session], config: NodeConfig, *,
            stop: threading.Event, progress: bool = True) -> dict[str, Any]:
    """IT's ``train --now``: run (or continue) a training in this process, outside windows.

    Returns
    -------
    dict
        ``job_id``, ``outcome`` and the job's recorded result.

    Raises
    ------
    LookupError
        If a training is running elsewhere, or no example waits.
    """
    worker_id = worker_identity(config.node.name)
    with session_factory() as session, session.begin():
        job = active_job(session, JobKind.TRAIN)
        if job is not None and job.state == JobState.RUNNING:
            raise LookupError(f"training job {job.id} is running in {job.claimed_by}; "
                              "wait for it to end (dafne-node status shows it)")
        if job is None:
            job = schedule_training(session, config, utcnow(), manual=True)
        if job is None:
            waiting = session.scalar(select(func.count()).select_from(Correction).where(
                Correction.state == CorrectionState.QUEUED)) or 0
            raise LookupError(f"no new correction to train on ({waiting} queued one(s) were "
                              "trained on by an earlier run or are held out for the gate)")
        claimed_job = claim_job(session, job.id, worker_id)
        if claimed_job is None:
            raise LookupError(f"training job {job.id} was just taken by the trainer process")
        claimed = ClaimedJob(claimed_job.id, JobKind.TRAIN, worker_id)
    handler = TrainHandler(session_factory, config, stop=stop, windowed=False,
                           progress=progress)
    JobRunner(session_factory, {JobKind.TRAIN: handler}, worker_id).run_claimed(claimed)
    with session_factory() as session:
        done = session.get(Job, claimed.id)
        assert done is not None
        result = dict(done.result or {})
        outcome = result.get("outcome") or done.state.value
        return {"job_id": done.id, "state": done.state.value, **result, "outcome": outcome,
                "reason": result.get("reason") or done.error}
