"""A trainer killed with SIGKILL mid-run loses no example, leaves no half model, and resumes.

The real ``dafne-node trainer`` process trains in an always-open window with a checkpoint
every two steps; it is killed as soon as a checkpoint exists. The examples and the database
must be as before the run, no local model directory may exist, and a new trainer process must
take the dead one's run over and finish it from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from dafne_node.model.checkpoint import CHECKPOINT_FILE
from db.node_models import Correction, CorrectionState, Job, JobKind, JobState
from tests.node.conftest import Node

# 12 steps: the kill comes right after the first checkpoint (step 2) on any machine, and the
# resumed run (the product's network, one thread: about 7 s a step on a CPU without bf16)
# ends well within its wait; 40 steps did not on such a CPU
TRAINER_TOML = """
[training]
min_new_examples = 2
steps = 12
threads = 1
checkpoint_every_steps = 2
check_every_s = 0.5

[[training.windows]]
name = "always"
cron = "* * * * *"
max_duration_h = 24
"""


def start_trainer(config: Path, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dafne_node", "--log-level", "info", "trainer",
             "--config", str(config), "--data-dir", str(data_dir)],
            stdout=out, stderr=subprocess.STDOUT)


def wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def train_job(node: Node) -> Job | None:
    with node[1]() as session:
        return session.scalars(select(Job).where(Job.kind == JobKind.TRAIN)).first()


def test_sigkill_mid_training_loses_nothing_and_the_next_trainer_resumes(
    corrected: Node, tmp_path: Path,
) -> None:
    config, sessions = corrected
    data_dir = config.node.data_dir
    toml = tmp_path / "trainer.toml"
    toml.write_text(TRAINER_TOML)
    with sessions() as session:
        examples = {c.id: data_dir / c.example_path for c in session.scalars(select(Correction))
                    if c.example_path}
    checkpoint = data_dir / "training" / "checkpoint"
    log = tmp_path / "trainer.log"

    first = start_trainer(toml, data_dir, log)
    try:
        wait((checkpoint / CHECKPOINT_FILE).is_file, 240,
             "a checkpoint of the running training")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    job = train_job(corrected)
    assert job is not None and job.state == JobState.RUNNING  # claimed by a dead process
    assert all(path.is_file() for path in examples.values()), "no example lost"
    with sessions() as session:
        assert set(session.scalars(select(Correction.state))) == {CorrectionState.QUEUED}
    assert not list((data_dir / "models").glob("*/model/manifest.json")), "no model yet"

    second = start_trainer(toml, data_dir, log)
    try:
        wait(lambda: (train_job(corrected) or job).state == JobState.DONE, 300,
             "the resumed training to end")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    done = train_job(corrected)
    assert done is not None and done.result["outcome"] == "accepted", done.result
    assert done.result["report"]["resumed_from"] >= 2, "continued from the checkpoint"
    assert "resuming the training of a trainer that died" in log.read_text()
    with sessions() as session:
        assert set(session.scalars(select(Correction.state))) == {CorrectionState.TRAINED}
