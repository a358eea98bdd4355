"""Faults with real peers: the node killed mid-push and mid-inference, and PACS down.

The design promises that nothing received is lost and that every series gets exactly one SEG,
whatever happens to the node or to PACS. Each test here breaks one thing for real and checks
the promise from the outside, with the same tools a hospital would use:

- the node is ``dafne-node serve`` killed with SIGKILL (no clean shutdown, as a crash or an
  OOM kill would leave it), then started again on the same data directory;
- the modality is dcmtk's ``/usr/bin/storescu`` with ``-v``, whose per-file log says which
  instances the node acknowledged with success before it died;
- PACS is a real Orthanc, killed and restarted on the same storage;
- the node's state is read straight from its SQLite database (``DIR/dafne.db``), with no node
  code involved, so a test sees exactly what a restart would find.

This module is also its driver: ``run_in_netns`` runs it as a script inside a fresh network
namespace (``python test_node_faults.py MODE WORKDIR MANIFEST``), where it prints one JSON
line that the pytest side checks. The driver imports only the standard library and the
harness, so it starts fast; the phantom series are written by the pytest side.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.netns import (
    DICOM_ENV,
    LOOPBACK,
    NODE_AET,
    STORESCU_BIN,
    ManagedProcess,
    OrthancProcess,
    driver_result,
    echoscu,
    emit_result,
    netns_unavailable_reason,
    run_in_netns,
    spawn,
    start_orthanc,
    storescu,
    wait_for,
)

NODE_PORT = 11112
ORTHANC_PORT = 4242
QUIET_PERIOD = 2.0
PUSH_QUIET_PERIOD = 3.0
"""Push-kill: the resend must reach the half-received series within one quiet period."""
SETTLE_S = 4.0
"""After the node has nothing left to do: how long to keep watching for a late duplicate SEG."""

NODE_ENV = {
    "DAFNE_DICOM__BIND": LOOPBACK,
    # PACS down: retry fast, and often enough that a slow Orthanc restart on a busy machine
    # never exhausts the attempts (this test is about delivery once PACS is back, not about
    # giving up, which the outbox's unit tests cover).
    "DAFNE_SENDING__BACKOFF_INITIAL_S": "1",
    "DAFNE_SENDING__BACKOFF_MAX_S": "2",
    "DAFNE_SENDING__MAX_ATTEMPTS": "60",
}
DAFNE_NODE = str(Path(sys.executable).with_name("dafne-node"))
ACTIVE_JOB_STATES = ("queued", "running", "sending")
CRASH_RECOVERY_LOG = "resuming after a crash"


# --------------------------------------------------------------------------------------------
# pytest side


def _write_series(tmp_path: Path, seeds: Sequence[int], slices: int,
                  matrix: int) -> Path:
    """Write one phantom series per seed (each its own study) and a manifest for the driver.

    The manifest lists, per series, its Study and Series Instance UIDs and each image file with
    its SOP Instance UID, so the driver can tell which instances an acknowledgement covered
    without decoding any DICOM.
    """
    from dafne_node.phantom import make_study  # noqa: PLC0415 - keep the driver's imports light
    from dafne_node.phantom.study import write_study  # noqa: PLC0415

    manifest: list[dict[str, Any]] = []
    for seed in seeds:
        study = make_study(site="A", seed=seed, slices=slices, matrix=matrix)
        files = write_study(study, tmp_path / f"study-{seed}")
        assert len(files.images) == len(study.sop_instance_uids) == slices
        manifest.append({
            "study_uid": study.study_instance_uid,
            "series_uid": study.series_instance_uid,
            "images": [{"path": str(path), "sop": sop}
                       for path, sop in zip(files.images, study.sop_instance_uids, strict=True)],
        })
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def _run(mode: str, tmp_path: Path, manifest: Path, timeout: float) -> dict[str, Any]:
    """Run the driver ``mode`` in a fresh namespace; its JSON result plus the wall time."""
    started = time.monotonic()
    completed = run_in_netns(__file__, [mode, tmp_path / "work", manifest], timeout=timeout)
    result = driver_result(completed)
    result["wall_s"] = round(time.monotonic() - started, 2)
    return result


@pytest.fixture(scope="module")
def push_kill(tmp_path_factory: pytest.TempPathFactory) -> PushKillRun:
    """One run of the push-kill scenario, shared by the two tests that check it.

    5 series x 40 instances of 96x96 (200 in all, one association) from storescu -v to the
    node, SIGKILL once 50 are indexed (so one series is cut in half), restart on the same
    data directory, resend everything, wait until the node has nothing left to do.
    """
    reason = netns_unavailable_reason()  # module scope runs before conftest's skip
    if reason is not None:
        pytest.skip(f"integration peers unavailable: {reason}")
    tmp_path = tmp_path_factory.mktemp("push-kill")
    manifest_path = _write_series(tmp_path, seeds=(31, 32, 33, 34, 35), slices=40, matrix=96)
    manifest: list[dict[str, Any]] = json.loads(manifest_path.read_text())
    return PushKillRun(manifest, _run("push-kill", tmp_path, manifest_path, timeout=200))


@dataclass(frozen=True)
class PushKillRun:
    """The phantom series pushed and what the push-kill driver saw."""

    manifest: list[dict[str, Any]]
    result: dict[str, Any]


def test_node_killed_during_push_loses_nothing(push_kill: PushKillRun) -> None:
    """SIGKILL during a 200-instance push: every instance acknowledged before the kill is
    indexed with its file on disk, a full resend is answered success throughout (duplicates
    included), all 200 are indexed once, and every series is segmented and delivered."""
    result, manifest = push_kill.result, push_kill.manifest
    sops = {image["sop"] for series in manifest for image in series["images"]}

    # The kill really interrupted the push: the node had indexed some, not all, and one
    # series was cut in half.
    assert result["exit_at_kill"] == -9, result
    assert 50 <= result["indexed_after_kill"] < 200, result
    assert result["partial_series_at_kill"] >= 1, result
    # Acknowledged means stored: every success storescu saw is indexed with its file on disk,
    # read from the database the dead node left behind (before any restart touched it).
    # storescu sends one instance at a time on its one association, so at the kill at most
    # one instance can be indexed without its success having reached storescu yet.
    acked = result["acked_before_kill"]
    assert len(acked) >= result["indexed_after_kill"] - 1, result
    assert set(acked) <= set(result["indexed_sops_after_kill"]), result
    assert result["acked_missing_spool_files"] == [], result

    # The modality resends everything; duplicates included, every instance gets success.
    assert result["resend_success"] == 200, result["resend_log_tail"]
    assert result["resend_rc"] == 0, result["resend_log_tail"]
    assert result["indexed_final"] == 200, result
    assert sorted(result["indexed_sops_final"]) == sorted(sops), result

    # Every series was segmented and its SEG delivered; nothing failed.
    study_uids = {series["study_uid"] for series in manifest}
    assert set(result["seg_instances_per_study"]) == study_uids, result
    assert "failed" not in result["jobs"], result["job_rows"]


def test_node_killed_during_push_sends_one_seg_per_series(push_kill: PushKillRun) -> None:
    """After the kill, the restart and the full resend, each series has exactly one SEG in
    Orthanc, watched until the node had nothing left to do and a few seconds more."""
    study_uids = {series["study_uid"] for series in push_kill.manifest}
    assert push_kill.result["seg_instances_per_study"] == dict.fromkeys(study_uids, 1), (
        push_kill.result["job_rows"])


def test_node_killed_during_inference_sends_exactly_one_seg(tmp_path: Path) -> None:
    """SIGKILL while the segment job is running: the restart requeues it (and says so in its
    log), the job ends done, and exactly one SEG instance reaches Orthanc."""
    manifest = _write_series(tmp_path, seeds=(41,), slices=40, matrix=128)
    result = _run("inference-kill", tmp_path, manifest, timeout=150)

    assert result["exit_at_kill"] == -9, result
    assert result["job_state_after_kill"] == "running", result
    assert result["crash_recovery_logged"] is True, result["restart_log_tail"]
    assert result["seg_series"] == 1, result
    assert result["seg_instances"] == 1, result
    assert result["seg_study_uid"] == json.loads(manifest.read_text())[0]["study_uid"]
    assert result["job"]["state"] == "done", result
    assert result["job"]["attempts"] == 2, result  # the killed run and the resumed one
    assert result["jobs"] == {"done": 1}, result
    assert result["outbox"] == [{"state": "sent", "count": 1}], result


def test_seg_is_delivered_once_orthanc_is_back(tmp_path: Path) -> None:
    """PACS killed before the SEG is ready: the outbox retries with a recorded reason and the
    SEG arrives, once, when the same Orthanc (same storage) is started again."""
    manifest = _write_series(tmp_path, seeds=(51,), slices=24, matrix=96)
    result = _run("orthanc-down", tmp_path, manifest, timeout=150)

    assert result["outbox_at_kill"] == 0, result  # PACS died before the SEG existed
    failing = result["outbox_while_down"]
    assert failing["state"] == "pending", failing
    assert failing["attempts"] >= 2, failing
    assert failing["last_error"], failing
    assert result["job_while_down"] == "sending", result
    assert result["seg_series"] == 1, result
    assert result["seg_instances"] == 1, result
    assert result["seg_study_uid"] == json.loads(manifest.read_text())[0]["study_uid"]
    assert result["job"]["state"] == "done", result
    delivered = result["outbox_final"]
    assert delivered["state"] == "sent", delivered
    assert delivered["attempts"] > failing["attempts"], delivered
    assert delivered["last_error"] is None, delivered


# --------------------------------------------------------------------------------------------
# driver side (inside the namespace)


def _query(work: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one read-only query on the node's database (a fresh connection each time)."""
    database = work / "node" / "dafne.db"
    if not database.exists():
        return []
    connection = sqlite3.connect(database, timeout=10)
    try:
        return list(connection.execute(sql, params).fetchall())
    finally:
        connection.close()


def _count(work: Path, sql: str, params: Sequence[Any] = ()) -> int:
    """The single number a ``select count(*)`` query returns (0 before the database exists)."""
    rows = _query(work, sql, params)
    return int(rows[0][0]) if rows else 0


def _by_state(work: Path, table: str) -> dict[str, int]:
    """Rows of ``table`` (jobs, outbox) counted by state."""
    return {str(state): int(n) for state, n in
            _query(work, f"select state, count(*) from {table} group by state")}


def _settled(work: Path) -> bool:
    """True when the node has no series assembling, no job active and nothing to send."""
    active_jobs = _count(work, "select count(*) from jobs where state in (?, ?, ?)",
                         ACTIVE_JOB_STATES)
    receiving = _count(work, "select count(*) from series where state = 'receiving'")
    unsent = _count(work, "select count(*) from outbox where state in ('pending', 'sending')")
    jobs = _count(work, "select count(*) from jobs")
    return jobs > 0 and active_jobs == 0 and receiving == 0 and unsent == 0


def _start_node(work: Path, log_name: str, quiet_period: float = QUIET_PERIOD) -> ManagedProcess:
    """Start ``dafne-node serve`` on ``work/node``; return once it answers C-ECHO."""
    node = spawn("dafne-node", [
        DAFNE_NODE, "--log-level", "info", "serve", "--data-dir", str(work / "node"),
        "--port", str(NODE_PORT), "--dest", f"ORTHANC@{LOOPBACK}:{ORTHANC_PORT}",
        "--quiet-period", str(quiet_period),
    ], work / log_name, env=NODE_ENV)

    def ready() -> bool:
        if not node.running:
            raise RuntimeError(f"the node exited with {node.popen.returncode}:\n"
                               f"{node.log_tail()}")
        return echoscu(NODE_PORT, aec=NODE_AET, timeout=2)

    try:
        wait_for(ready, 90, interval=0.2, what="the Dafne node answering C-ECHO")
    except BaseException:
        node.kill()
        raise
    return node


def _storescu_verbose(files: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start storescu -v towards the node in the background, its log in ``log``."""
    command = [STORESCU_BIN, "-v", "-aet", "MODALITY", "-aec", NODE_AET, "-R",
               "-to", "10", "-ta", "10", "-td", "10", LOOPBACK, str(NODE_PORT), *files]
    with log.open("wb") as out:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **DICOM_ENV})


_SENDING = re.compile(r"^I: Sending file: (.+?)\s*$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+?)\)")


def _acknowledged(log_text: str) -> list[str]:
    """Files that storescu -v logged a success response for, in order.

    storescu logs ``I: Sending file: PATH`` before each C-STORE and
    ``I: Received Store Response (Success)`` when the peer answers; a response belongs to
    the file sent last.
    """
    acked: list[str] = []
    current: str | None = None
    for line in log_text.splitlines():
        if sending := _SENDING.match(line):
            current = sending[1]
        elif (response := _RESPONSE.match(line)) and current is not None:
            if response[1] == "Success":
                acked.append(current)
            current = None
    return acked


def _seg_instances_per_study(orthanc: OrthancProcess) -> dict[str, int]:
    """Number of SEG instances Orthanc holds, per Study Instance UID."""
    counts: Counter[str] = Counter()
    for series in orthanc.find_series(modality="SEG"):
        study = orthanc.get(f"/studies/{series['ParentStudy']}")
        counts[study["MainDicomTags"]["StudyInstanceUID"]] += len(series["Instances"])
    return dict(counts)


def _wait_settled(work: Path, node: ManagedProcess, timeout: float) -> None:
    """Wait until the node has finished everything, then watch ``SETTLE_S`` more seconds."""
    def settled() -> bool:
        if not node.running:
            raise RuntimeError(f"the node exited with {node.popen.returncode}:\n"
                               f"{node.log_tail()}")
        return _settled(work)

    wait_for(settled, timeout, interval=0.25, what="the node to finish its jobs")
    time.sleep(SETTLE_S)
    wait_for(settled, timeout, interval=0.25, what="the node to finish its jobs (again)")


def _seg_summary(orthanc: OrthancProcess) -> dict[str, Any]:
    """SEG series and instances in Orthanc, and the study of the (first) SEG."""
    found = orthanc.find_series(modality="SEG")
    per_study = _seg_instances_per_study(orthanc)
    return {
        "seg_series": len(found),
        "seg_instances": sum(len(series["Instances"]) for series in found),
        "seg_study_uid": next(iter(per_study), None),
        "seg_instances_per_study": per_study,
    }


def _job_rows(work: Path) -> list[dict[str, Any]]:
    """Every job of the node with its state, attempts and error, oldest first."""
    return [{"id": i, "state": s, "attempts": a, "error": e} for i, s, a, e in
            _query(work, "select id, state, attempts, error from jobs order by id")]


def _kill(process: ManagedProcess | None) -> None:
    """SIGKILL a node that was started (no-op for None or a process already gone)."""
    if process is not None:
        process.kill()


def _drive_push_kill(work: Path, manifest: list[dict[str, Any]]) -> dict[str, Any]:
    """Push all series, SIGKILL the node at 50 indexed, restart, resend all, wait for SEGs."""
    files = [image["path"] for series in manifest for image in series["images"]]
    sop_of = {image["path"]: image["sop"] for series in manifest for image in series["images"]}
    node: ManagedProcess | None = None
    push: subprocess.Popen[bytes] | None = None
    with start_orthanc(work / "orthanc", node_port=NODE_PORT) as orthanc:
        try:
            node = _start_node(work, "node-1.log", PUSH_QUIET_PERIOD)
            push = _storescu_verbose(files, work / "storescu-1.log")
            indexed = lambda: _count(work, "select count(*) from instances")  # noqa: E731
            wait_for(lambda: indexed() >= 50, 60, interval=0.005, what="50 instances indexed")
            exit_at_kill = node.kill()
            push.wait(timeout=60)
            indexed_sops_after_kill = [row[0] for row in _query(
                work, "select sop_instance_uid from instances")]
            spooled = dict(_query(work, "select sop_instance_uid, spool_path from instances"))
            sizes = {series["series_uid"]: len(series["images"]) for series in manifest}
            partial = [uid for uid, n in _query(
                work, "select series_instance_uid, num_instances from series")
                if 0 < n < sizes[uid]]
            acked = [sop_of[path] for path in _acknowledged(
                (work / "storescu-1.log").read_text(errors="replace"))]
            missing_files = [sop for sop in acked if sop in spooled and not (
                work / "node" / "spool" / spooled[sop]).is_file()]

            node = _start_node(work, "node-2.log", PUSH_QUIET_PERIOD)
            resend = _storescu_verbose(files, work / "storescu-2.log")
            resend_rc = resend.wait(timeout=120)
            resend_log = (work / "storescu-2.log").read_text(errors="replace")
            wait_for(lambda: len(_seg_instances_per_study(orthanc)) >= len(manifest), 150,
                     interval=0.5, what="a SEG for every series in Orthanc")
            _wait_settled(work, node, 60)
            return {
                "exit_at_kill": exit_at_kill,
                "indexed_after_kill": len(indexed_sops_after_kill),
                "indexed_sops_after_kill": indexed_sops_after_kill,
                "storescu_1_rc": push.returncode,
                "partial_series_at_kill": len(partial),
                "acked_before_kill": acked,
                "acked_missing_spool_files": missing_files,
                "resend_rc": resend_rc,
                "resend_success": len(_acknowledged(resend_log)),
                "resend_log_tail": resend_log[-2000:],
                "indexed_final": indexed(),
                "indexed_sops_final": [row[0] for row in _query(
                    work, "select sop_instance_uid from instances")],
                "seg_instances_per_study": _seg_instances_per_study(orthanc),
                "jobs": _by_state(work, "jobs"),
                "job_rows": _job_rows(work),
            }
        finally:
            if push is not None and push.poll() is None:
                push.kill()
            _kill(node)


def _drive_inference_kill(work: Path, manifest: list[dict[str, Any]]) -> dict[str, Any]:
    """Push one series, SIGKILL the node while its job runs, restart, wait for the SEG."""
    files = [image["path"] for image in manifest[0]["images"]]
    node: ManagedProcess | None = None
    with start_orthanc(work / "orthanc", node_port=NODE_PORT) as orthanc:
        try:
            node = _start_node(work, "node-1.log")
            storescu(files, port=NODE_PORT, aec=NODE_AET, aet="MODALITY")
            wait_for(lambda: _count(work, "select count(*) from jobs where state = 'running'"),
                     60, interval=0.01, what="the segment job running")
            exit_at_kill = node.kill()
            state_after_kill = [row[0] for row in _query(work, "select state from jobs")]

            node = _start_node(work, "node-2.log")
            wait_for(lambda: orthanc.find_series(modality="SEG"), 120, interval=0.5,
                     what="a SEG series in Orthanc")
            _wait_settled(work, node, 60)
            restart_log = node.log_path.read_text(errors="replace")
            [job] = _job_rows(work)
            return {
                "exit_at_kill": exit_at_kill,
                "job_state_after_kill": state_after_kill[0] if len(state_after_kill) == 1
                else state_after_kill,
                "crash_recovery_logged": CRASH_RECOVERY_LOG in restart_log,
                "restart_log_tail": "\n".join(
                    line for line in restart_log.splitlines() if "dafne_node." in line)[-3000:],
                **_seg_summary(orthanc),
                "job": job,
                "jobs": _by_state(work, "jobs"),
                "outbox": [{"state": s, "count": n} for s, n in _query(
                    work, "select state, count(*) from outbox group by state")],
            }
        finally:
            _kill(node)


def _outbox_row(work: Path) -> dict[str, Any] | None:
    """The outbox's only row as a dict; None while there is none (or, unexpectedly, several)."""
    rows = _query(work, "select state, attempts, last_error from outbox order by id")
    if len(rows) != 1:
        return None
    state, attempts, last_error = rows[0]
    return {"state": state, "attempts": attempts, "last_error": last_error}


def _drive_orthanc_down(work: Path, manifest: list[dict[str, Any]]) -> dict[str, Any]:
    """Push one series, kill Orthanc, watch the outbox retry, restart Orthanc, get the SEG."""
    files = [image["path"] for image in manifest[0]["images"]]
    node: ManagedProcess | None = None
    orthanc: OrthancProcess | None = start_orthanc(work / "orthanc", node_port=NODE_PORT)
    try:
        node = _start_node(work, "node.log")
        storescu(files, port=NODE_PORT, aec=NODE_AET, aet="MODALITY")
        assert orthanc is not None
        orthanc.kill()  # PACS crashes while the node assembles the series
        outbox_at_kill = _count(work, "select count(*) from outbox")

        def retrying() -> dict[str, Any] | None:
            row = _outbox_row(work)
            if row and row["state"] == "pending" and row["attempts"] >= 2 and row["last_error"]:
                return row
            return None

        while_down: dict[str, Any] = wait_for(retrying, 90, interval=0.05,
                                              what="the outbox retrying with a reason")
        job_while_down = [row[0] for row in _query(work, "select state from jobs")]

        orthanc = start_orthanc(work / "orthanc", node_port=NODE_PORT)
        wait_for(lambda: orthanc is not None and orthanc.find_series(modality="SEG"), 60,
                 interval=0.25, what="the SEG in Orthanc once it is back")
        _wait_settled(work, node, 60)
        [job] = _job_rows(work)
        return {
            "outbox_at_kill": outbox_at_kill,
            "outbox_while_down": while_down,
            "job_while_down": job_while_down[0] if len(job_while_down) == 1 else job_while_down,
            **_seg_summary(orthanc),
            "job": job,
            "outbox_final": _outbox_row(work),
        }
    finally:
        _kill(node)
        if orthanc is not None:
            orthanc.stop()


DRIVERS: dict[str, Callable[[Path, list[dict[str, Any]]], dict[str, Any]]] = {
    "push-kill": _drive_push_kill,
    "inference-kill": _drive_inference_kill,
    "orthanc-down": _drive_orthanc_down,
}

if __name__ == "__main__":
    mode, work_dir, manifest_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    work_dir.mkdir(parents=True, exist_ok=True)
    emit_result(DRIVERS[mode](work_dir, json.loads(manifest_path.read_text())))
