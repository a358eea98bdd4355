"""One simulated hospital: its PACS and its Dafne node, as real processes and real DICOM.

The PACS is a Storage SCP in the driver's process (it receives the node's SEGs); the node is
``dafne-node serve`` with its own data folder, DICOM port and admin port, configured to
federate with the run's server, and with an always-open training window, so it trains as
soon as ``min_new_examples`` corrections have arrived. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread

from dicom_scp.receiver import StorageServer
from dicom_scp.sender import AssociationError, echo, send_files
from dicom_scp.spool import Spool
from tests.dicom_scp.helpers import MemoryIndex

DAFNE_NODE = str(Path(sys.executable).with_name("dafne-node"))
LOGGER = logging.getLogger(__name__)

RETRY_PAUSE_S = 2.0
"""Pause before a send's second attempt; it grows by as much before each later one."""


@dataclass(frozen=True)
class HospitalPlan:
    """Who a hospital is in the run: its protocol (site), how often it trains, honesty."""

    name: str
    site: str
    train_every: int = 1
    """It receives studies and trains every ``train_every``-th generation."""
    poison: str | None = None
    """``None`` (honest), ``"label-flip"`` (its corrections permute the muscles)."""


@dataclass(frozen=True)
class NodeSettings:
    """The node's training settings for the run (the same at every hospital)."""

    model_dir: Path
    """The run's root model (generation 1 of the server)."""
    min_new_examples: int
    steps: int
    learning_rate: float
    contrast_fold: float = 0.0
    replay_fraction: float = 0.5
    threads: int = 1
    compile: bool = False
    poll_interval_s: float = 1.0


def _toml(value: Any) -> str:
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


class ArmStoppedError(RuntimeError):
    """An arm stopped early: another arm of the run failed, or the run was interrupted."""


class Hospital:
    """A PACS and a node; :meth:`start` launches both, :meth:`stop` ends both.

    Every wait of the driver on the node ends within half a second of ``stop`` being set
    (:class:`ArmStoppedError`), so that an interrupted run stops its nodes at once rather
    than after the training run it was waiting for.
    """

    def __init__(self, plan: HospitalPlan, folder: Path, *, dicom_port: int, http_port: int,
                 federation: Mapping[str, str], settings: NodeSettings,
                 stop: threading.Event | None = None) -> None:
        self.plan = plan
        self.folder = folder
        self.dicom_port = dicom_port
        self.http_port = http_port
        self._federation = federation
        self._settings = settings
        self._index = MemoryIndex()
        self._pacs = StorageServer(ae_title="PACS", host="127.0.0.1", port=0,
                                   spool=Spool(folder / "pacs"), index=self._index)
        self._node: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
        """One client for every status poll: each ``httpx.get`` builds a TLS context (even
        for plain HTTP), which cost the driver a sixth of its CPU at two polls a second."""
        self.log = folder / "node.log"
        self._stop = stop or threading.Event()

    def start(self) -> None:
        """Start the PACS, then the node; return when the node answers C-ECHO and HTTP."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pacs.start()
        self._start_node()

    def _start_node(self) -> None:
        settings = self._settings
        config = self.folder / "node.toml"
        config.write_text(
            f'default_destination = "pacs"\n[[destinations]]\nname = "pacs"\n'
            f'ae_title = "PACS"\nhost = "127.0.0.1"\nport = {self._pacs.port}\n'
            "[assembly]\nquiet_period_s = 3\n"
            f"[model]\ndir = {_toml(settings.model_dir)}\n"
            f"[training]\nmin_new_examples = {settings.min_new_examples}\n"
            f"steps = {settings.steps}\nlearning_rate = {settings.learning_rate!r}\n"
            f"contrast_fold = {settings.contrast_fold!r}\n"
            f"replay_fraction = {settings.replay_fraction!r}\n"
            f"threads = {settings.threads}\ncompile = {str(settings.compile).lower()}\n"
            "check_every_s = 1\n"
            '[[training.windows]]\nname = "always"\ncron = "* * * * *"\nmax_duration_h = 24\n'
            "[federation]\n"
            + "".join(f"{key} = {_toml(value)}\n" for key, value in self._federation.items())
            + f"poll_interval_s = {settings.poll_interval_s}\nretry_initial_s = 1\n")
        env = {**os.environ, "DAFNE_DATA_DIR": str(self.folder / "node"),
               "DAFNE_DICOM__BIND": "127.0.0.1", "DAFNE_PORT": str(self.dicom_port),
               "DAFNE_HTTP_PORT": str(self.http_port), "DAFNE_DICOM__MIN_FREE_DISK_MB": "0"}
        with self.log.open("ab") as out:
            self._node = subprocess.Popen(
                [DAFNE_NODE, "--log-level", "info", "serve", "--config", str(config)],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        self._wait("the node to answer C-ECHO", self._echo_ok, 120)
        # the admin API starts after the DICOM listener; on a busy machine, seconds later
        self._wait("the node's admin API", self.status, 120)

    def stop(self) -> None:
        """SIGTERM the node (it finishes what it holds), then stop the PACS."""
        self._stop_node()
        self._pacs.stop()
        self._http.close()

    def restart_node(self) -> None:
        """Stop and start the node (it polls the federation at start)."""
        self._stop_node()
        self._start_node()

    def _stop_node(self) -> None:
        if self._node is not None and self._node.poll() is None:
            self._node.terminate()
            try:
                self._node.wait(120)
            except subprocess.TimeoutExpired:
                self._node.kill()
                self._node.wait()

    def _echo_ok(self) -> bool:
        if self._node is not None and self._node.poll() is not None:
            raise RuntimeError(f"{self.plan.name}: the node exited: {self.log_tail()}")
        try:
            return echo(f"DAFNE@127.0.0.1:{self.dicom_port}", timeout=2) == 0
        except AssociationError:
            return False

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the node's log, for error messages."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def _wait(self, what: str, condition: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._stop.is_set():
                raise ArmStoppedError(f"{self.plan.name}: stopped while waiting for {what}")
            value = condition()
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"{self.plan.name}: timed out waiting for {what}: {self.log_tail()}")

    def send(self, files: Sequence[Path], calling_ae: str, *, attempts: int = 3) -> None:
        """C-STORE ``files`` to the node (a modality's series, or a viewer's correction).

        Files that fail, or all of them when no association is made, are sent again after
        a pause, as a modality or PACS retries, up to ``attempts`` times; each retry is
        logged, since a node should not need them. (A driver starved of CPU can be slower
        than the node's 5 s wait for an association request, and the node then rightly
        closes the connection.)
        """
        pending = list(files)
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(RETRY_PAUSE_S * (attempt - 1))
            try:
                results = send_files(pending, f"DAFNE@127.0.0.1:{self.dicom_port}",
                                     calling_ae=calling_ae)
            except AssociationError as exc:
                LOGGER.warning("%s: no association for %d file(s) (attempt %d): %s",
                               self.plan.name, len(pending), attempt, exc)
                continue
            failed = [r for r in results if not r.ok]
            if not failed:
                return
            LOGGER.warning("%s: %d of %d file(s) not stored (attempt %d): %s", self.plan.name,
                           len(failed), len(pending), attempt, failed[0].error)
            pending = [Path(r.path) for r in failed]
        raise RuntimeError(f"{self.plan.name}: {len(pending)} file(s) not stored after "
                           f"{attempts} attempts")

    def segs(self) -> dict[str, Path]:
        """The node's SEGs the PACS holds, by the Series Instance UID they segment."""
        out = {}
        for record in list(self._index.records.values()):
            path = self.folder / "pacs" / record.spool_path
            if not path.exists():  # indexed, its file not renamed into place yet
                continue
            seg = dcmread(path, stop_before_pixels=True)
            out[str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)] = path
        return out

    def wait_segs(self, series_uids: Sequence[str], timeout: float) -> dict[str, Path]:
        """Wait until the PACS has the node's SEG of each series; return them by series."""
        def ready() -> dict[str, Path] | None:
            found = self.segs()
            return {uid: found[uid] for uid in series_uids} \
                if all(uid in found for uid in series_uids) else None
        return self._wait(f"{len(series_uids)} SEG(s)", ready, timeout)

    def status(self) -> dict[str, Any]:
        """The node's ``/status`` (empty while it does not answer)."""
        try:
            return self._http.get("/status").json()
        except (httpx.TransportError, ValueError):
            return {}

    def wait_status(self, what: str, condition: Callable[[dict[str, Any]], bool],
                    timeout: float) -> dict[str, Any]:
        """Wait until ``condition(status)`` holds; return that status."""
        def check() -> dict[str, Any] | None:
            status = self.status()
            return status if status and condition(status) else None
        return self._wait(what, check, timeout)
