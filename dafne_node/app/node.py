"""The node process: receiver, assembler, job runner, outbox, federation sync and admin API.

``dafne-node serve`` runs every part of the node in one process, the embedded default, and
the trainer (:mod:`dafne_node.app.trainer`) as a child process;
``dafne-node worker`` runs only the processing parts, so several processes can share one
PostgreSQL database; ``dafne-node trainer`` trains in IT's windows, never in a process
that segments. Each part of the node is a loop in its own thread that polls the database,
so the database is the only thing the parts share and a part that crashes is logged and
restarted rather than taking the node down.

SIGTERM (or Ctrl-C) stops accepting associations, lets the current job and the
current delivery finish, and exits; anything unfinished is resumed at the next
start, because every step is a committed row.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from types import FrameType

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import NodeConfig
from dafne_node.inference.assemble import SeriesAssembler
from dafne_node.inference.deliver import OutboxSender, requeue_interrupted_sends
from dafne_node.inference.model import ActiveModel
from dafne_node.inference.segment import SegmentHandler
from dafne_node.jobs.runner import JobHandler, JobRunner, worker_identity
from dafne_node.learning.corrections import CorrectionHandler
from dafne_node.retention import apply_retention
from db.base import utcnow
from db.federation_sync import release_sync_leases
from db.jobs import requeue_stale_jobs
from db.migrate import upgrade
from db.node_models import (
    FederationSync,
    Job,
    JobKind,
    JobState,
    OutboxItem,
    Series,
    SeriesState,
)
from db.repository import SqlInstanceIndex
from db.session import make_engine, make_session_factory
from dicom_scp.admission import AdmissionLimits
from dicom_scp.policy import AllowedCaller, CallerPolicy, DiskWatermark
from dicom_scp.receiver import StorageServer
from dicom_scp.spool import Spool

LOGGER = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 10.0
STALE_AFTER = timedelta(seconds=90)
"""A running job whose worker stopped heart-beating this long ago is taken over."""
SEND_STALE_AFTER = timedelta(minutes=30)
"""A send claimed this long ago belongs to a dead process (sends time out far sooner)."""


def open_database(config: NodeConfig) -> tuple[Engine, sessionmaker[Session]]:
    """Connect to the node database and bring its schema to the current version."""
    engine = make_engine(config.database_url)
    upgrade(engine)
    return engine, make_session_factory(engine)


class _Loop(threading.Thread):
    """Runs ``step`` until stopped; waits up to ``idle_s`` when it found no work.

    ``then`` is woken whenever this loop did work (the assembler wakes the
    worker, the worker wakes the outbox), so a series goes from complete to
    delivered without waiting out poll intervals. An exception is logged and the
    loop waits before trying again: one bad series must not stop the node.
    """

    def __init__(self, name: str, step: Callable[[], object], idle_s: float,
                 stop: threading.Event, then: _Loop | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self._step = step
        self._idle_s = idle_s
        self._stop_event = stop
        self._then = then
        self.wakeup = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                busy = self._step()
            except Exception:
                LOGGER.exception("%s failed; retrying in 5 s", self.name)
                self._stop_event.wait(5.0)
                continue
            if busy:
                if self._then is not None:
                    self._then.wakeup.set()
                continue
            self.wakeup.wait(self._idle_s)
            self.wakeup.clear()


class Node:
    """One node process.

    Parameters
    ----------
    config:
        The validated configuration.
    dicom:
        Run the Storage SCP (off for extra worker processes).
    http:
        Run the admin API.
    trainer_command:
        Start this command as the trainer process beside the node (``serve``).
    sync:
        Run the federation sync client when ``[federation]`` has a URL; by default in the
        process that runs the receiver (``serve``), which shares the data directory with
        the trainer's deltas, not in extra workers that may run on other hosts.
    """

    def __init__(self, config: NodeConfig, *, dicom: bool = True, http: bool = True,
                 trainer_command: Sequence[str] | None = None,
                 sync: bool | None = None) -> None:
        self.config = config
        self.worker_id = worker_identity(config.node.name)
        self.engine, self.sessions = open_database(config)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._dicom = dicom
        self._http = http
        self.storage: StorageServer | None = None
        self._http_server: object | None = None
        self._trainer = _ChildProcess("trainer", trainer_command) if trainer_command else None
        self._next_retention = 0.0
        self.models = ActiveModel(self.sessions, config)
        self._sync = config.federation.enabled and (dicom if sync is None else sync)

    @property
    def model_info(self) -> tuple[str, int]:
        """Name and generation of the model this process segments with."""
        manifest = self.models.segmenter.manifest
        return manifest.name, manifest.generation

    def start(self) -> None:
        """Recover from a previous crash, then start every part."""
        self._recover()
        if self._dicom:
            self.storage = self._storage_server()
            self.storage.start()
        assembler = SeriesAssembler(self.sessions, self.config)
        runner = JobRunner(self.sessions, self._handlers(), self.worker_id)
        outbox = OutboxSender(self.sessions, self.config, self.worker_id)
        sending = _Loop("outbox", outbox.run_once, 0.5, self._stop)
        segmenting = _Loop("job-runner", runner.run_once, 0.5, self._stop, then=sending)
        loops = [
            _Loop("assembler", assembler.run_once, 0.25, self._stop, then=segmenting),
            segmenting,
            sending,
            _Loop("maintenance", self._maintain, HEARTBEAT_EVERY_S, self._stop),
        ]
        self._threads.extend(loops)
        for loop in loops:
            loop.start()
        if self._http:
            self._start_http()
        if self._sync:
            self._start_sync()
        if self._trainer is not None:
            self._trainer.start()
        LOGGER.info("node %s started (model %s g%d)", self.worker_id, *self.model_info)

    def _handlers(self) -> dict[JobKind, JobHandler]:
        """The job kinds this process runs: segmentation and correction handling."""
        return {
            JobKind.SEGMENT: SegmentHandler(self.sessions, self.config, self.models),
            JobKind.CORRECTION: CorrectionHandler(self.sessions, self.config,
                                                  self.models.segmenter.labels),
        }

    def _storage_server(self) -> StorageServer:
        dicom = self.config.dicom
        policy = CallerPolicy([AllowedCaller(c.ae_title, c.host) for c in dicom.allowed_callers])
        spool = Spool(self.config.spool_dir)
        return StorageServer(
            ae_title=dicom.ae_title, host=dicom.bind, port=dicom.port, spool=spool,
            index=SqlInstanceIndex(self.engine), policy=policy,
            watermark=DiskWatermark(self.config.spool_dir, dicom.min_free_disk_mb * 2**20),
            max_associations=dicom.max_associations,
            admission=AdmissionLimits(
                request_timeout_s=dicom.association_request_timeout_s,
                max_pending_per_address=dicom.max_waiting_per_address,
            ),
            max_instance_bytes=dicom.max_instance_mb * 2**20,
        )

    def _start_http(self) -> None:
        import uvicorn  # noqa: PLC0415 - only processes that serve HTTP need it

        from dafne_node.api import create_app  # noqa: PLC0415

        app = create_app(session_factory=self.sessions, model_info=lambda: self.model_info,
                         ready=lambda: not self._stop.is_set(),
                         windows=self.config.training.windows,
                         data_dir=self.config.node.data_dir,
                         federation=self.config.federation)
        server = uvicorn.Server(uvicorn.Config(
            app, host=self.config.http.host, port=self.config.http.port, log_level="warning",
            lifespan="off",
        ))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._http_server = server
        thread = threading.Thread(target=server.run, name="admin-api", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _start_sync(self) -> None:
        """The federation sync client, in its own thread (it waits on the network)."""
        # Imported here: only federating nodes need the HTTP client.
        from dafne_node.learning.sync import SyncClient  # noqa: PLC0415

        client = SyncClient(self.config, self.sessions, owner=self.worker_id)
        thread = threading.Thread(target=client.run, args=(self._stop,),
                                  name="federation-sync", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _recover(self) -> None:
        """Take back the work of dead processes on this host before starting."""
        dead = dead_local_claims(self.sessions, self.config)
        now = utcnow()
        with self.sessions() as session, session.begin():
            jobs = requeue_stale_jobs(session, stale_after=STALE_AFTER, dead_workers=dead,
                                      now=now)
            sends = requeue_interrupted_sends(session, claimed_before=now - SEND_STALE_AFTER,
                                              dead_workers=dead)
            leases = release_sync_leases(session, dead)
            # Series still receiving were interrupted mid-push: the sender will resend the
            # rest, so their quiet period starts again now rather than at the crash.
            reopened = session.execute(
                update(Series).where(Series.state == SeriesState.RECEIVING)
                .values(last_received_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
        if jobs or sends or reopened or leases:
            LOGGER.warning("resuming after a crash: %d job(s) and %d delivery(ies) requeued, "
                           "%d incomplete series wait for their quiet period again, "
                           "%d federation sync lease(s) released", jobs, sends, reopened, leases)

    def _maintain(self) -> bool:
        with self.sessions() as session, session.begin():
            session.execute(
                update(Job).where(Job.state == JobState.RUNNING,
                                  Job.claimed_by == self.worker_id)
                .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False)
            )
            requeued = requeue_stale_jobs(session, stale_after=STALE_AFTER)
            resent = requeue_interrupted_sends(session,
                                               claimed_before=utcnow() - SEND_STALE_AFTER)
        if requeued or resent:
            LOGGER.warning("took over %d stale job(s) and %d stale delivery(ies)", requeued,
                           resent)
        if self._trainer is not None and not self._stop.is_set():
            self._trainer.restart_if_dead()
        if time.monotonic() >= self._next_retention:
            self._next_retention = time.monotonic() + self.config.retention.check_every_h * 3600
            apply_retention(self.sessions, self.config)
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting work, finish what is in hand, and return."""
        LOGGER.info("node %s stopping", self.worker_id)
        if self.storage is not None:
            self.storage.stop()
        self._stop.set()
        if self._trainer is not None:
            self._trainer.stop(timeout)
        for thread in self._threads:
            if isinstance(thread, _Loop):
                thread.wakeup.set()
        if self._http_server is not None:
            self._http_server.should_exit = True  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.engine.dispose()
        LOGGER.info("node %s stopped", self.worker_id)

    def run_until_signalled(self, on_started: Callable[[], None] | None = None) -> None:
        """Start, call ``on_started``, wait for SIGTERM or SIGINT, stop."""
        stop = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            LOGGER.info("received %s", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        if on_started is not None:
            on_started()
        while not stop.wait(1.0):
            pass
        self.stop()


def dead_local_claims(sessions: sessionmaker[Session], config: NodeConfig) -> list[str]:
    """Worker ids of this host and node name whose process no longer runs."""
    prefix = f"{config.node.name}@{socket.gethostname()}:"
    with sessions() as session:
        claimants = set(session.scalars(
            select(Job.claimed_by).where(Job.claimed_by.startswith(prefix)).distinct()
        )) | set(session.scalars(
            select(OutboxItem.claimed_by).where(OutboxItem.claimed_by.startswith(prefix))
            .distinct()
        )) | set(session.scalars(
            select(FederationSync.lease_owner)
            .where(FederationSync.lease_owner.startswith(prefix)).distinct()
        ))
    return [claimant for claimant in claimants
            if claimant and not _pid_alive(int(claimant.rsplit(":", 1)[1]))]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a previous process with our pid: it is not us running that job
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _ChildProcess:
    """A process role that ``serve`` runs beside itself (the trainer), restarted if it dies.

    Why a child process rather than a thread: training sets torch's thread count and holds
    its own memory, which must never touch the inference in this process.
    """

    RESTART_AFTER_S = 30.0

    def __init__(self, name: str, command: Sequence[str]) -> None:
        self.name = name
        self._command = list(command)
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0

    def start(self) -> None:
        self._process = subprocess.Popen(self._command)
        self._started_at = time.monotonic()
        LOGGER.info("%s process started (pid %d)", self.name, self._process.pid)

    def restart_if_dead(self) -> None:
        if self._process is None or self._process.poll() is None:
            return
        if time.monotonic() - self._started_at < self.RESTART_AFTER_S:
            return  # dying at once again and again: do not spin
        LOGGER.error("%s process exited with code %s; restarting it", self.name,
                     self._process.returncode)
        self.start()

    def stop(self, timeout: float) -> None:
        """SIGTERM, then wait: a training run stops at its next step and keeps a checkpoint."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            LOGGER.error("%s process did not stop within %.0f s; killed", self.name, timeout)
            self._process.kill()
            self._process.wait()
