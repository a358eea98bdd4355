"""One whole federated cycle with real processes, and only weights leave the hospital.

A node (``dafne-node serve`` with its trainer) receives two site-C studies over DICOM and
sends their SEGs to a PACS (a Storage SCP in this test). The radiologist's corrections
(highdicom SEGs of the truth) come back over DICOM; the trainer fine-tunes in its (always
open) window and the sync client uploads the delta. A federation server (``serve`` +
``worker``) aggregates it into generation 2; the node pulls it, verifies it and switches:
the next study's SEG names ``g2``.

Every byte the node sends to the federation goes through a recording proxy. Afterwards
the record must contain the upload and the pull, and none of the studies' identifiers
(patient name and ID, accession number, birth and study dates, study/series/SOP Instance
UIDs of images and SEGs) and no run of their pixel data.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydicom import dcmread

from dafne_node.phantom import make_study
from dafne_node.phantom.render import PhantomStudy
from dafne_node.phantom.study import write_study
from dicom_scp.receiver import StorageServer
from dicom_scp.sender import AssociationError, echo, send_files
from dicom_scp.spool import Spool
from tests.dicom_scp.helpers import MemoryIndex
from tests.federation.proxy import CapturingProxy
from tests.federation.server import set_up, start_api, start_worker, toml_value
from tests.harness.writers import leg_segments, write_highdicom

DAFNE_NODE = str(Path(sys.executable).with_name("dafne-node"))
NODE_PORT = 11794
HTTP_PORT = 18794
SLICES = 16


def _private_study(seed: int, number: int) -> PhantomStudy:
    """A site-C study with identifiers long enough to be found if they ever leak."""
    study = make_study(site="C", seed=seed, slices=SLICES)
    return dataclasses.replace(
        study, patient_name=f"Privacy^Ingrid^{number:03d}", patient_id=f"PID-55443{number:03d}",
        patient_birth_date=f"195104{number + 11}", study_date=f"202611{number + 11}",
        accession_number=f"ACC-998877{number:02d}")


def _wait(what: str, condition: Callable[[], Any], timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-4000:]}")


def _status() -> dict[str, Any]:
    try:
        return httpx.get(f"http://127.0.0.1:{HTTP_PORT}/status", timeout=5).json()
    except httpx.TransportError:
        return {}


def test_a_correction_becomes_a_generation_every_node_pulls(tmp_path: Path) -> None:
    federation = set_up(tmp_path / "server", sections={
        "aggregation": {"buffer_size": 1, "check_every_s": 0.5},
        "gate": {"max_mean_drop": 1.0, "max_site_drop": 1.0}})
    pacs_index = MemoryIndex()
    pacs = StorageServer(ae_title="PACS", host="127.0.0.1", port=0,
                         spool=Spool(tmp_path / "pacs"), index=pacs_index)
    pacs.start()
    studies = [_private_study(4000 + n, n) for n in range(3)]
    files = [write_study(study, tmp_path / f"study{n}") for n, study in enumerate(studies)]
    log = tmp_path / "node.log"
    node: subprocess.Popen[bytes] | None = None
    try:
        with start_api(federation) as url, start_worker(federation), \
                CapturingProxy(int(url.rsplit(":", 1)[1])) as proxy:
            config = tmp_path / "node.toml"
            config.write_text(
                f'default_destination = "pacs"\n[[destinations]]\nname = "pacs"\n'
                f'ae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
                "[assembly]\nquiet_period_s = 1\n"
                "[training]\nmin_new_examples = 2\nsteps = 15\nthreads = 1\n"
                "check_every_s = 1\n"
                '[[training.windows]]\nname = "always"\ncron = "* * * * *"\n'
                "max_duration_h = 24\n"
                f"[federation]\nurl = {toml_value(f'http://127.0.0.1:{proxy.port}')}\n"
                f"token = {toml_value(federation.tokens['hospital-a'])}\n"
                f"public_key = {toml_value(federation.public_key)}\n"
                "poll_interval_s = 1\nretry_initial_s = 1\n")
            env = {**os.environ, "DAFNE_DATA_DIR": str(tmp_path / "node"),
                   "DAFNE_DICOM__BIND": "127.0.0.1", "DAFNE_PORT": str(NODE_PORT),
                   "DAFNE_HTTP_PORT": str(HTTP_PORT), "DAFNE_DICOM__MIN_FREE_DISK_MB": "0"}
            with log.open("ab") as out:
                node = subprocess.Popen([DAFNE_NODE, "--log-level", "info", "serve", "--config",
                                         str(config)], env=env, stdout=out,
                                        stderr=subprocess.STDOUT)
            _wait("the node", _echo_ok, 90, log)

            for study_files in files[:2]:
                assert all(r.ok for r in send_files(study_files.images,
                                                    f"DAFNE@127.0.0.1:{NODE_PORT}",
                                                    calling_ae="MODALITY"))
            _wait("two SEGs at the PACS", lambda: len(pacs_index.records) >= 2, 180, log)
            corrections = []
            for n, (study, study_files) in enumerate(zip(studies[:2], files[:2], strict=True)):
                out = write_highdicom(study_files.images, study.labels, leg_segments(),
                                      tmp_path / f"correction{n}.dcm")
                corrections.append(out)
                assert all(r.ok for r in send_files([out], f"DAFNE@127.0.0.1:{NODE_PORT}",
                                                    calling_ae="VIEWER"))
            status = _wait("generation 2 in use", lambda: (
                s := _status()).get("federation", {}).get("generation_in_use") == 2 and s,
                420, log)
            assert status["federation"]["uploads"]["sent"] == 1, status["federation"]
            assert status["federation"]["last_error"] is None, status["federation"]

            assert all(r.ok for r in send_files(files[2].images, f"DAFNE@127.0.0.1:{NODE_PORT}",
                                                 calling_ae="MODALITY"))
            _wait("the third SEG", lambda: len(pacs_index.records) >= 3, 180, log)
            captured = proxy.sent
    finally:
        if node is not None:
            node.terminate()
            node.wait(timeout=90)
        pacs.stop()

    descriptions = {dcmread(tmp_path / "pacs" / record.spool_path).SeriesDescription
                    for record in pacs_index.records.values()}
    assert "Dafne leg g2" in descriptions, descriptions

    assert b"POST /v1/models/leg/updates" in captured
    assert b"GET /v1/models/leg/generations/2/weights" in captured
    segs = [dcmread(tmp_path / "pacs" / record.spool_path, stop_before_pixels=True)
            for record in pacs_index.records.values()]
    segs += [dcmread(path, stop_before_pixels=True) for path in corrections]
    _assert_no_identifier(captured, studies, segs)
    _assert_no_pixel_run(captured, files)


def _echo_ok() -> bool:
    try:
        return echo(f"DAFNE@127.0.0.1:{NODE_PORT}", timeout=2) == 0
    except AssociationError:
        return False


def _assert_no_identifier(captured: bytes, studies: list[PhantomStudy], segs: list[Any]
                          ) -> None:
    identifiers: set[str] = set()
    for study in studies:
        identifiers |= {study.patient_name, study.patient_name.replace("^", " "),
                        study.patient_id, study.accession_number, study.patient_birth_date,
                        study.study_date, study.study_instance_uid,
                        study.series_instance_uid, study.frame_of_reference_uid,
                        *study.sop_instance_uids}
    for seg in segs:
        identifiers |= {seg.SOPInstanceUID, seg.SeriesInstanceUID}
    for identifier in identifiers:
        assert identifier.encode() not in captured, f"{identifier!r} left the hospital"


def _assert_no_pixel_run(captured: bytes, files: list[Any], run: int = 32) -> None:
    """No 32-byte run of any image's pixel data (skipping flat, low-information runs)."""
    checked = 0
    for study_files in files:
        for path in study_files.images:
            pixels = bytes(dcmread(path).PixelData)
            for start in range(0, len(pixels) - run, 997):
                window = pixels[start:start + run]
                if len(np.unique(np.frombuffer(window, dtype=np.uint8))) < 12:
                    continue
                checked += 1
                assert window not in captured, f"pixel data of {path.name} left the hospital"
    assert checked > 1000  # the check looked at real image content
