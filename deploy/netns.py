"""Real DICOM peers (Orthanc, dcmtk) inside a private network namespace.

Used by the demo (``deploy/demo.py``), the latency benchmark and the integration tests.

Why a namespace: Orthanc 1.10 binds its DICOM and HTTP ports on 0.0.0.0 whatever the
configuration says, and several test runs (and several engineers) share this machine. Each
integration test therefore runs a *driver script* with ``run_in_netns``: ``unshare -n`` gives
it a fresh network namespace holding only a loopback interface, so Orthanc, dcmtk and the node
can use their well-known ports (4242, 8042, 11112) without colliding with anybody and without
being reachable from outside. The driver and the pytest process cannot talk over the network
(different namespaces); they share the filesystem, and the driver prints one JSON line as its
result (``emit_result``), which the test reads back with ``driver_result``.

Two halves:

- used by pytest (outside): ``netns_unavailable_reason``, ``run_in_netns``, ``driver_result``;
- used by the driver (inside): ``start_orthanc`` (the configuration in ``deploy/orthanc/`` with
  ports, paths and timings substituted), ``start_storescp``, ``storescu``, ``echoscu``, the
  Orthanc REST helpers on ``OrthancProcess`` and ``wait_for``.

Every wait is bounded; every child process is stopped by ``stop()`` (use ``with``), dies with
its parent (``PR_SET_PDEATHSIG``) and is in the driver's process group, which ``run_in_netns``
kills at the end whatever happened. dcmtk and Orthanc (linked against dcmtk) get
``TCP_NODELAY=1`` in their environment: dcmtk reads it to switch off Nagle's algorithm on its
DICOM sockets, without which small PDUs wait for delayed ACKs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DIR = REPO_ROOT / "deploy" / "orthanc"
DEPLOY_CONFIG = DEPLOY_DIR / "orthanc.json"
DEPLOY_LUA = DEPLOY_DIR / "dafne-autoroute.lua"

ORTHANC_BIN = "/usr/sbin/Orthanc"
STORESCU_BIN = "/usr/bin/storescu"
STORESCP_BIN = "/usr/bin/storescp"
ECHOSCU_BIN = "/usr/bin/echoscu"

LOOPBACK = "127.0.0.1"
ORTHANC_AET = "ORTHANC"
NODE_AET = "DAFNE"
DICOM_ENV = {"TCP_NODELAY": "1"}
"""Environment for every dcmtk tool and for Orthanc: TCP_NODELAY on their DICOM sockets."""

_T = TypeVar("_T")
_PR_SET_PDEATHSIG = 1

# urllib would honour http_proxy/https_proxy from the environment; inside the namespace only
# loopback exists, so Orthanc is always reached directly.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------------------------
# Outside: run a driver in a fresh namespace


def netns_unavailable_reason() -> str | None:
    """Why integration drivers cannot run here, or None when they can.

    Creating a network namespace needs root (CAP_SYS_ADMIN); ``ip`` comes from iproute2;
    Orthanc and dcmtk are Debian packages (``deploy/setup.sh`` installs them).
    """
    for tool in ("unshare", "ip", ORTHANC_BIN, STORESCU_BIN, STORESCP_BIN, ECHOSCU_BIN):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (see deploy/setup.sh)"
    try:
        probe = subprocess.run(
            ["unshare", "-n", "sh", "-c", "ip link set lo up"],
            capture_output=True, text=True, timeout=20, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n failed: {exc}"
    if probe.returncode != 0:
        return f"unshare -n needs root here: {probe.stderr.strip() or probe.returncode}"
    return None


def run_in_netns(script: str | Path, args: Sequence[str | Path], timeout: float, *,
                 env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python script args...`` in a new network namespace with loopback up.

    The driver runs with this interpreter, the repository root as working directory and on
    ``PYTHONPATH`` (so it can ``import deploy.netns``), in its own session. When it
    ends, or after ``timeout`` seconds, its whole process group is killed, so an Orthanc or
    storescp left behind by a failing driver never outlives the call. On timeout
    ``subprocess.TimeoutExpired`` is raised with the output captured so far.
    """
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
    child_env["PYTHONUNBUFFERED"] = "1"
    # "$0" "$@" keeps arguments out of the shell's parser: no quoting issues.
    command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
               sys.executable, str(script), *(str(a) for a in args)]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate(timeout=30)
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    finally:
        _kill_group(proc.pid)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the driver's process group (the group may be gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def driver_result(completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON object on the driver's last stdout line; an AssertionError with its logs if not.

    A driver that crashed or printed no result fails the test with its exit status and the
    tail of its stderr, which is where a traceback or an Orthanc log excerpt is.
    """
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    if completed.returncode != 0 or not lines or not lines[-1].lstrip().startswith("{"):
        raise AssertionError(
            f"driver exited with {completed.returncode} and no JSON result\n"
            f"--- stdout (tail)\n{completed.stdout[-3000:]}\n"
            f"--- stderr (tail)\n{completed.stderr[-6000:]}")
    result = json.loads(lines[-1])
    if not isinstance(result, dict):
        raise AssertionError(f"driver result is not a JSON object: {lines[-1][:200]}")
    return result


# --------------------------------------------------------------------------------------------
# Inside: helpers for the driver


def emit_result(result: Mapping[str, Any]) -> None:
    """Write the driver's result: one JSON line on stdout, its whole interface to the test."""
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


def wait_for(predicate: Callable[[], _T], timeout: float, *, interval: float = 0.1,
             what: str = "condition") -> _T:
    """Poll ``predicate`` until it returns something truthy, and return that; bounded.

    Raises TimeoutError naming ``what`` after ``timeout`` seconds, so a peer that never
    answers fails the test instead of hanging it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(min(interval, remaining))


def _die_with_parent() -> None:
    """In the forked child: get SIGKILL when the driver dies, even by SIGKILL itself."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DICOM_ENV)
    return env


@dataclass
class ManagedProcess:
    """A long-running peer (Orthanc, storescp) with its log file; stop it in ``finally``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        return int(self.popen.returncode)

    def kill(self) -> int:
        """SIGKILL now, as a crash would; returns the exit status (-9)."""
        if self.popen.poll() is None:
            self.popen.kill()
        return int(self.popen.wait(timeout=10))

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the peer's log, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(name: str, command: Sequence[str], log_path: Path, *,
          env: Mapping[str, str] | None = None, cwd: Path | None = None) -> ManagedProcess:
    """Start a peer (e.g. ``dafne-node serve``) with stdout and stderr appended to ``log_path``.

    It gets ``TCP_NODELAY=1`` plus ``env`` on top of this environment and dies with the driver.
    Waiting until it is ready is the caller's job (``wait_for`` with ``echoscu``, say).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = _tool_env()
    child_env.update(env or {})
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=child_env, cwd=cwd,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 -- drivers fork before starting threads
        )
    return ManagedProcess(name, popen, log_path)


def echoscu(port: int, *, aec: str = ORTHANC_AET, aet: str = "ECHOSCU", host: str = LOOPBACK,
            timeout: float = 5.0) -> bool:
    """C-ECHO with dcmtk's echoscu; True when the peer accepted the association and answered."""
    seconds = str(max(1, round(timeout)))
    try:
        done = subprocess.run(
            [ECHOSCU_BIN, "-aet", aet, "-aec", aec, "-to", seconds, "-ta", seconds,
             "-td", seconds, host, str(port)],
            capture_output=True, env=_tool_env(), timeout=timeout + 5, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def storescu(files: Iterable[str | Path], *, port: int, aec: str = ORTHANC_AET,
             aet: str = "STORESCU", host: str = LOOPBACK, timeout: float = 60.0,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """Send files (and directories, recursively) with dcmtk's storescu, as a modality would.

    Only the presentation contexts the files need are proposed (``-R``), so any storage SOP
    class (MR, SEG...) goes through. With ``check`` a failed send raises CalledProcessError
    whose output holds storescu's log.
    """
    paths = [str(f) for f in files]
    command = [STORESCU_BIN, "-aet", aet, "-aec", aec, "-R",
               "-to", "10", "-ta", "10", "-td", "30"]
    if any(Path(p).is_dir() for p in paths):
        command += ["+sd", "+r"]
    command += [host, str(port), *paths]
    done = subprocess.run(command, capture_output=True, text=True, env=_tool_env(),
                          timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    return done


def start_storescp(out_dir: Path, port: int, *, aet: str = NODE_AET,
                   log_path: Path | None = None, startup_timeout: float = 15.0) -> ManagedProcess:
    """Start dcmtk's storescp as a stand-in DICOM node writing every instance to ``out_dir``.

    Returns once it answers C-ECHO. Files are named ``<modality>.<SOP Instance UID>``
    (storescp's default scheme).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log_path or out_dir.parent / f"storescp-{port}.log"
    proc = spawn("storescp", [STORESCP_BIN, "-aet", aet, "-od", str(out_dir), "-dhl",
                               "+xa", "-ta", "10", "-td", "30", str(port)], log)
    try:
        wait_for(lambda: _alive_and(proc, lambda: echoscu(port, aec=aet, timeout=2)),
                 startup_timeout, interval=0.05, what=f"storescp {aet} on port {port}")
    except BaseException:
        proc.stop()
        raise
    return proc


def _alive_and(proc: ManagedProcess, check: Callable[[], bool]) -> bool:
    if not proc.running:
        raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                           f"{proc.log_tail()}")
    return check()


# --------------------------------------------------------------------------------------------
# Orthanc


@dataclass(frozen=True)
class OrthancSettings:
    """What the harness substitutes into ``deploy/orthanc/orthanc.json`` for one test PACS."""

    dicom_port: int = 4242
    http_port: int = 8042
    node_ae: str = NODE_AET
    node_host: str = LOOPBACK
    node_port: int = 11112
    stable_age: int = 2
    scu_timeout: int = 5
    route_corrections: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)


def orthanc_config(workdir: Path, settings: OrthancSettings) -> dict[str, Any]:
    """The deploy configuration adapted to a test: ports, storage under ``workdir``, timings.

    Everything else (routing script, AE title, access rules) is the file PACS administrators
    get, so the tests exercise the deployed configuration rather than a test-only one.
    """
    config: dict[str, Any] = json.loads(DEPLOY_CONFIG.read_text())
    storage = workdir / "orthanc-db"
    modality = dict(config["DicomModalities"]["dafne"])
    modality.update(AET=settings.node_ae, Host=settings.node_host, Port=settings.node_port,
                    Timeout=settings.scu_timeout)
    config.update({
        "Name": f"test PACS {settings.dicom_port}",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "LuaScripts": [str(workdir / "dafne-settings.lua"), str(workdir / DEPLOY_LUA.name)],
        "HttpPort": settings.http_port,
        "DicomPort": settings.dicom_port,
        "DicomModalities": {"dafne": modality},
        "StableAge": settings.stable_age,
        "DicomScuTimeout": settings.scu_timeout,
        "DicomAssociationCloseDelay": 0,
        # Orthanc's WebDAV upload thread alone holds shutdown up for 2 s; no test uses WebDAV.
        "WebDavEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
    })
    config.update(settings.overrides)
    return config


def write_orthanc_config(workdir: Path, settings: OrthancSettings) -> Path:
    """Write ``workdir/orthanc.json``, the routing script and its settings; return the config."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEPLOY_LUA, workdir / DEPLOY_LUA.name)
    lua_settings = (
        "-- written by deploy/netns.py, read before dafne-autoroute.lua\n"
        "DAFNE_MODALITY = 'dafne'\n"
        f"DAFNE_AET = {json.dumps(settings.node_ae)}\n"
        f"DAFNE_ROUTE_CORRECTIONS = {'true' if settings.route_corrections else 'false'}\n")
    (workdir / "dafne-settings.lua").write_text(lua_settings)
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(orthanc_config(workdir, settings), indent=2))
    return path


_DECISION = re.compile(
    r"dafne-autoroute: (routed|skipped) series ([0-9a-f-]+) \((.*)\)(?: to \S+ as job (\S+))?\s*$",
    re.MULTILINE)


@dataclass(frozen=True)
class RoutingDecision:
    """What ``dafne-autoroute.lua`` decided for one stable series, read from Orthanc's log."""

    routed: bool
    series_id: str
    reason: str
    job_id: str | None


@dataclass
class OrthancProcess(ManagedProcess):
    """A running Orthanc and small REST helpers on it (urllib only: no extra dependency)."""

    settings: OrthancSettings = field(default_factory=OrthancSettings)
    workdir: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.settings.http_port}"

    @property
    def dicom_port(self) -> int:
        return self.settings.dicom_port

    def get_bytes(self, path: str, timeout: float = 10.0) -> bytes:
        """GET ``path`` (e.g. ``/system``) and return the body."""
        with _HTTP.open(self.url + path, timeout=timeout) as response:
            return bytes(response.read())

    def get(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``path`` and decode its JSON."""
        return json.loads(self.get_bytes(path, timeout))

    def post(self, path: str, body: Any, timeout: float = 30.0) -> Any:
        """POST ``body`` (JSON-encoded unless bytes) to ``path`` and decode the JSON answer."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with _HTTP.open(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def answers(self) -> bool:
        """True when the REST API answers ``/system`` (False while starting or stopped)."""
        try:
            self.get("/system", timeout=2)
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return True

    def studies(self) -> list[dict[str, Any]]:
        return list(self.get("/studies?expand"))

    def series(self) -> list[dict[str, Any]]:
        return list(self.get("/series?expand"))

    def instances(self) -> list[dict[str, Any]]:
        return list(self.get("/instances?expand"))

    def series_instances(self, series_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/series/{series_id}/instances"))

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of one instance, as stored."""
        return self.get_bytes(f"/instances/{instance_id}/file", timeout=30)

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.get("/jobs?expand"))

    def routing_decisions(self) -> dict[str, RoutingDecision]:
        """The routing script's latest decision per Orthanc series ID, from the log.

        The script logs every decision, so a test can wait for proof that a series was *not*
        routed (an absence of jobs alone proves nothing until the series was stable).
        """
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return {}
        return {m[2]: RoutingDecision(m[1] == "routed", m[2], m[3], m[4])
                for m in _DECISION.finditer(text)}

    def find_series(self, *, modality: str | None = None,
                    series_instance_uid: str | None = None) -> list[dict[str, Any]]:
        """Expanded series whose main DICOM tags match all the criteria given."""
        found = []
        for series in self.series():
            tags = series.get("MainDicomTags", {})
            if modality is not None and tags.get("Modality") != modality:
                continue
            if (series_instance_uid is not None
                    and tags.get("SeriesInstanceUID") != series_instance_uid):
                continue
            found.append(series)
        return found


def start_orthanc(workdir: Path, *, dicom_port: int = 4242, http_port: int = 8042,
                  node_ae: str = NODE_AET, node_host: str = LOOPBACK, node_port: int = 11112,
                  stable_age: int = 2, scu_timeout: int = 5, route_corrections: bool = False,
                  overrides: Mapping[str, Any] | None = None,
                  startup_timeout: float = 30.0) -> OrthancProcess:
    """Start Orthanc with the deploy configuration; return once REST and DICOM both answer.

    Call it inside a namespace (Orthanc binds 0.0.0.0). The log is ``workdir/orthanc.log``;
    ``--verbose`` is on so routing decisions and jobs appear in it. The caller stops it
    (``with start_orthanc(...) as orthanc:``).
    """
    settings = OrthancSettings(dicom_port=dicom_port, http_port=http_port, node_ae=node_ae,
                               node_host=node_host, node_port=node_port, stable_age=stable_age,
                               scu_timeout=scu_timeout, route_corrections=route_corrections,
                               overrides=dict(overrides or {}))
    config = write_orthanc_config(workdir, settings)
    base = spawn("orthanc", [ORTHANC_BIN, "--verbose", str(config)],
                  workdir / "orthanc.log")
    orthanc = OrthancProcess(base.name, base.popen, base.log_path, settings, workdir)
    try:
        wait_for(lambda: _alive_and(orthanc, orthanc.answers), startup_timeout,
                 interval=0.1, what=f"Orthanc REST on port {http_port}")
        wait_for(lambda: _alive_and(orthanc, lambda: echoscu(dicom_port, timeout=2)),
                 startup_timeout, interval=0.1, what=f"Orthanc DICOM on port {dicom_port}")
    except BaseException:
        orthanc.stop()
        raise
    return orthanc
