"""Training in IT's windows on a controlled clock: when runs are queued, stop and resume, outcome.

The clock is a function the scheduler and the trainer ask; tests move it instead of
sleeping. Runs are a few steps long: what is checked is the scheduling and the life cycle
of a run, not what it learns (the end-to-end test and the benchmark check that).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from dafne_node.app.cli import main
from dafne_node.app.trainer import Trainer
from dafne_node.config import NodeConfig, load_config
from dafne_node.learning import training
from dafne_node.learning.training import schedule_training
from dafne_node.model.infer import resolve_precision
from db.jobs import requeue_stale_jobs
from db.node_models import Correction, CorrectionState, Job, JobKind, JobState, Model
from tests.node.conftest import Node

WINDOW = '[[training.windows]]\nname = "night"\ncron = "0 1 * * *"\ntimezone = "UTC"\n' \
         'max_duration_h = 2\n'
OPENS = datetime(2026, 12, 4, 1, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves; ``tick`` moves it on every reading (a run that takes time)."""

    def __init__(self, now: datetime, tick: timedelta = timedelta(0)) -> None:
        self.now = now
        self.tick = tick

    def __call__(self) -> datetime:
        now = self.now
        self.now += self.tick
        return now


def training_config(node: Node, tmp_path: Path, **training: object) -> NodeConfig:
    config, _ = node
    settings = {"steps": 6, "min_new_examples": 2, "threads": 1, **training}
    lines = "".join(f"{key} = {value!r}\n".replace("'", '"').replace("True", "true")
                    .replace("False", "false") for key, value in settings.items())
    toml = tmp_path / "training.toml"
    toml.write_text(f"[training]\n{lines}{WINDOW}")
    return load_config(toml, environ={}, overrides={("node", "data_dir"): config.node.data_dir})


def trainer(node: Node, config: NodeConfig, clock: Callable[[], datetime]) -> Trainer:
    made = Trainer(config, clock=clock)
    made.sessions = node[1]
    return made


def train_jobs(node: Node) -> list[Job]:
    with node[1]() as session:
        return list(session.scalars(select(Job).where(Job.kind == JobKind.TRAIN)
                                    .order_by(Job.id)))


def test_a_run_is_queued_only_in_a_window_with_enough_new_examples_and_never_twice(
    corrected: Node, tmp_path: Path,
) -> None:
    _, sessions = corrected
    config = training_config(corrected, tmp_path, min_new_examples=2)
    strict = training_config(corrected, tmp_path / "..", min_new_examples=3)
    with sessions() as session, session.begin():
        assert schedule_training(session, config, OPENS - timedelta(minutes=1)) is None
        assert schedule_training(session, strict, OPENS + timedelta(minutes=5)) is None
        job = schedule_training(session, config, OPENS + timedelta(minutes=5))
        assert job is not None and job.payload["new_examples"] == 2
        assert schedule_training(session, config, OPENS + timedelta(minutes=6)) is None
    assert [j.state for j in train_jobs(corrected)] == [JobState.QUEUED]


def test_a_run_stops_at_the_window_end_and_resumes_in_the_next_one_across_a_restart(
    corrected: Node, tmp_path: Path,
) -> None:
    _, sessions = corrected
    config = training_config(corrected, tmp_path, min_new_examples=1, steps=6,
                             max_dice_drop=1.0)
    # Every reading of the clock moves it 20 minutes: the 2-hour window closes mid-run.
    clock = Clock(OPENS + timedelta(minutes=1), tick=timedelta(minutes=20))
    first = trainer(corrected, config, clock)
    assert first.tick() is True
    [job] = train_jobs(corrected)
    assert job.state == JobState.QUEUED, job.error
    assert job.not_before == OPENS + timedelta(days=1), "waits for the next window"
    assert "stopped" in (job.error or "") or "interrupted" in (job.error or ""), job.error
    checkpoints = list((config.node.data_dir / "training").rglob("*"))
    assert checkpoints, "the interrupted run kept a checkpoint"

    assert first.tick() is False, "no window is open and none may start a run"

    # A new trainer process (after a restart), in the next night's window, with time to spare.
    later = Clock(OPENS + timedelta(days=1, minutes=1))
    second = trainer(corrected, config, later)
    assert second.tick() is True
    [job] = train_jobs(corrected)
    assert job.state == JobState.DONE, job.error
    assert job.result["outcome"] == "accepted", job.result
    assert job.result["report"]["resumed_from"] > 0, "continued from the checkpoint"
    assert job.result["version_label"] == "g1-local1"
    with sessions() as session:
        states = set(session.scalars(select(Correction.state).where(
            Correction.id.in_(job.result["examples"]))))
        model = session.scalars(select(Model).where(Model.active)).one()
    assert states == {CorrectionState.TRAINED}
    assert (model.local_round, model.source) == (1, "local")
    assert Path(job.result["delta_path"]).is_file()
    assert second.tick() is False, "nothing new to train on"


def test_a_run_that_loses_dice_on_held_out_examples_is_rejected_and_trains_nothing(
    corrected: Node, tmp_path: Path,
) -> None:
    _, sessions = corrected
    config = training_config(corrected, tmp_path, min_new_examples=1, steps=6,
                             max_dice_drop=0.0, learning_rate=1.0, holdout_fraction=0.5)
    # Correction 1 is held out for the gate (its id hashes below 0.5), correction 2 trains;
    # a learning rate of 1 wrecks the model, which the gate must catch.
    run = trainer(corrected, config, Clock(OPENS + timedelta(minutes=1)))
    assert run.tick() is True
    [job] = train_jobs(corrected)
    assert job.state == JobState.DONE
    assert job.result["outcome"] == "rejected", job.result
    assert "drop" in job.result["reason"]
    assert job.result["heldout"] == [1] and job.result["examples"] == [2]
    assert np.isfinite(job.result["base_heldout"]["mean_dice"])
    with sessions() as session:
        assert session.scalars(select(Model).where(Model.local_round > 0)).all() == []
        states = dict(session.execute(select(Correction.id, Correction.state)).all())
    assert states == {1: CorrectionState.QUEUED, 2: CorrectionState.QUEUED}


def test_train_now_runs_the_waiting_corrections_in_the_foreground(
    corrected: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config, _ = corrected
    toml = tmp_path / "now.toml"
    toml.write_text("[training]\nsteps = 4\nthreads = 1\n")
    data = ["--config", str(toml), "--data-dir", str(config.node.data_dir)]
    assert main(["train", "--now", "--json", *data]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["outcome"] == "accepted", outcome
    assert outcome["version_label"] == "g1-local1"
    assert sorted(outcome["examples"]) == [1, 2]

    assert main(["train", "--now", *data]) == 1, "nothing new to train on"
    assert "no new correction to train on" in capsys.readouterr().err
    assert main(["status", "--json", *data]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["training"]["last_run"]["outcome"] == "accepted"
    assert status["model"]["version"] == "g1-local1"
    assert status["corrections"]["trained"] == 2


@pytest.mark.skipif(resolve_precision("auto") != "bf16",
                    reason="[training] compile applies to bf16 training; this CPU has no bf16")
def test_compile_in_the_config_compiles_the_trainers_run(
    corrected: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    config = training_config(corrected, tmp_path, min_new_examples=1, steps=3,
                             max_dice_drop=1.0, compile=True)
    caplog.set_level(logging.INFO, logger="dafne_node.model.train")
    assert trainer(corrected, config, Clock(OPENS + timedelta(minutes=1))).tick() is True
    [job] = train_jobs(corrected)
    assert job.state == JobState.DONE and job.result["outcome"] == "accepted", job.result
    assert "bf16 compiled" in caplog.text


def after_each_step(monkeypatch: pytest.MonkeyPatch, hook: Callable[[int], None]) -> None:
    """Run ``hook(step)`` at the end of each step of the trainer's runs (step 1 first).

    The trainer's heartbeat ticks every 0.1 s here, so a hook that sleeps a few tenths of a
    second stands for a step that outlasts the node's take-over limit.
    """
    monkeypatch.setattr(training, "HEARTBEAT_EVERY_S", 0.1)
    real_finetune = training.finetune

    def finetune(*args: object, between_steps: Callable[[], None], **kwargs: object) -> object:
        steps = itertools.count(1)

        def hooked() -> None:
            hook(next(steps))
            between_steps()
        return real_finetune(*args, between_steps=hooked, **kwargs)

    monkeypatch.setattr(training, "finetune", finetune)


def test_a_step_longer_than_the_take_over_limit_keeps_its_job(
    corrected: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first step of a compiled run compiles for minutes: the node must not take it over.

    The run's first step is made to last 1.5 s, three take-over limits of 0.5 s; at its end
    the node's take-over sweep runs, as the node's maintenance loop would, and must find
    nothing stale.
    """
    _, sessions = corrected
    config = training_config(corrected, tmp_path, min_new_examples=1, steps=3,
                             max_dice_drop=1.0)
    taken_over: list[int] = []

    def slow_first_step_then_sweep(step: int) -> None:
        if step == 1:
            time.sleep(1.5)
            with sessions() as session, session.begin():
                taken_over.append(requeue_stale_jobs(session,
                                                     stale_after=timedelta(seconds=0.5)))

    after_each_step(monkeypatch, slow_first_step_then_sweep)
    assert trainer(corrected, config, Clock(OPENS + timedelta(minutes=1))).tick() is True
    assert taken_over == [0], "the node took the running job over"
    [job] = train_jobs(corrected)
    assert job.state == JobState.DONE, job.error
    assert job.result["outcome"] == "accepted", job.result
    assert job.result["report"]["resumed_from"] == 0, "the run never restarted"


def test_a_run_whose_job_was_taken_over_stops_and_leaves_it_to_the_new_owner(
    corrected: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A trainer silent too long (a frozen VM) learns at its next step that the job is gone."""
    _, sessions = corrected
    config = training_config(corrected, tmp_path, min_new_examples=1, steps=40,
                             max_dice_drop=1.0)
    steps: list[int] = []

    def taken_over_after_the_first_step(step: int) -> None:
        steps.append(step)
        if step == 1:  # another trainer claims the job; the heartbeat notices
            with sessions() as session, session.begin():
                job = session.scalars(select(Job).where(Job.kind == JobKind.TRAIN)).one()
                job.claimed_by = "other-trainer"
            time.sleep(0.5)

    after_each_step(monkeypatch, taken_over_after_the_first_step)
    trainer(corrected, config, Clock(OPENS + timedelta(minutes=1))).tick()
    assert len(steps) < 5, f"the run went on for {len(steps)} steps after losing its job"
    [job] = train_jobs(corrected)
    assert (job.state, job.claimed_by, job.result) == (JobState.RUNNING, "other-trainer", None)
    with sessions() as session:
        assert set(session.scalars(select(Correction.state))) == {CorrectionState.QUEUED}
        assert session.scalars(select(Model).where(Model.local_round > 0)).all() == []
