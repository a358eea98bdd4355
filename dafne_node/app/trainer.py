"""The trainer process (``dafne-node trainer``): training never shares a process with inference.

torch's thread pool and memory are per process; a training run inside the node would retune
inference. ``serve`` starts this process beside itself; it can also run on its own for a
node whose workers run elsewhere.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from datetime import datetime
from types import FrameType

from dafne_node.app.node import STALE_AFTER, dead_local_claims, open_database
from dafne_node.config import NodeConfig
from dafne_node.jobs.runner import JobRunner, worker_identity
from dafne_node.learning.training import TrainHandler, schedule_training
from dafne_node.learning.windows import open_window
from db.base import utcnow
from db.jobs import requeue_stale_jobs
from db.node_models import JobKind

__all__ = ["Trainer"]

LOGGER = logging.getLogger(__name__)


class Trainer:
    """The trainer process (``dafne-node trainer``): trains in IT's windows, one run at a time.

    Every ``training.check_every_s`` it queues a training run when one is due
    (:func:`dafne_node.learning.training.schedule_training`) and, while a window is open,
    runs queued train jobs through the same job runner as every other kind. SIGTERM stops
    a run at its next step with a checkpoint; the run continues in the next trainer.
    """

    def __init__(self, config: NodeConfig, *, clock: Callable[[], datetime] = utcnow,
                 exit_with_parent: bool = False) -> None:
        self.config = config
        self._parent = os.getppid() if exit_with_parent else None
        self.worker_id = worker_identity(config.node.name)
        self.engine, self.sessions = open_database(config)
        self._tick_s = config.training.check_every_s
        self._clock = clock
        self.stop_event = threading.Event()
        self._runner = JobRunner(self.sessions, {JobKind.TRAIN: TrainHandler(
            self.sessions, config, stop=self.stop_event, clock=clock)}, self.worker_id,
            clock=clock)

    def tick(self) -> bool:
        """Queue a run if one is due, and run one queued run if a window is open."""
        now = self._clock()
        with self.sessions() as session, session.begin():
            schedule_training(session, self.config, now)
        if open_window(self.config.training.windows, now) is None:
            return False
        return self._runner.run_once() is not None

    def run_until_signalled(self) -> None:
        """Tick until SIGTERM or SIGINT."""
        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            LOGGER.info("trainer received %s", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        if self._parent is not None:
            threading.Thread(target=self._exit_with_parent, name="parent-watch",
                             daemon=True).start()
        dead = dead_local_claims(self.sessions, self.config)
        with self.sessions() as session, session.begin():
            taken = requeue_stale_jobs(session, stale_after=STALE_AFTER, dead_workers=dead,
                                       kinds=[JobKind.TRAIN])
        if taken:
            LOGGER.warning("resuming the training of a trainer that died: %d run(s) requeued",
                           taken)
        LOGGER.info("trainer %s started", self.worker_id)
        while not self.stop_event.is_set():
            try:
                busy = self.tick()
            except Exception:
                LOGGER.exception("trainer tick failed; retrying in %.0f s", self._tick_s)
                busy = False
            if not busy:
                self.stop_event.wait(self._tick_s)
        self.engine.dispose()
        LOGGER.info("trainer %s stopped", self.worker_id)

    def _exit_with_parent(self) -> None:
        """Stop (at the next step, checkpoint kept) when the node that started us is gone.

        A node killed with SIGKILL cannot stop its trainer; an orphaned trainer would train
        on beside the restarted node's own.
        """
        while not self.stop_event.wait(1.0):
            if os.getppid() != self._parent:
                LOGGER.warning("the node process %d that started this trainer is gone; "
                               "stopping", self._parent)
                self.stop_event.set()
