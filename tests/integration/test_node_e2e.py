"""The node's main job with real peers: modality -> Orthanc -> Dafne node -> SEG in Orthanc.

``/usr/bin/storescu`` (dcmtk, the modality) pushes a 40-slice phantom study to Orthanc (the
PACS); Orthanc's deploy configuration routes the stable MR series to ``dafne-node serve``; the
node's SEG must arrive in Orthanc in the same study and match the phantom's truth.

This module is also its driver, run inside a fresh network namespace by ``run_in_netns``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from deploy.netns import (
    NODE_AET,
    OrthancProcess,
    driver_result,
    echoscu,
    emit_result,
    run_in_netns,
    spawn,
    start_orthanc,
    storescu,
    wait_for,
)

NODE_PORT = 11112
QUIET_PERIOD = 2.0
DRIVER_TIMEOUT = 240.0
DAFNE_NODE = str(Path(sys.executable).with_name("dafne-node"))


# --------------------------------------------------------------------------------------------
# pytest side


def test_pushed_study_comes_back_with_a_seg(tmp_path: Path) -> None:
    from pydicom import dcmread  # noqa: PLC0415 - keep the driver's imports light

    from dafne_node.dicom.seg_decode import SourceFrame, decode_segmentation  # noqa: PLC0415
    from dafne_node.model.labels import LEG_MUSCLES  # noqa: PLC0415
    from dafne_node.model.metrics import dice_per_label, mean_dice  # noqa: PLC0415
    from dafne_node.phantom import make_study  # noqa: PLC0415
    from dafne_node.phantom.study import write_study  # noqa: PLC0415

    study = make_study(site="A", seed=21, slices=40)
    files = write_study(study, tmp_path / "study")
    completed = run_in_netns(__file__, ["e2e", tmp_path / "work", files.images[0].parent],
                             timeout=DRIVER_TIMEOUT)
    result = driver_result(completed)
    assert result["seg_series"] == 1, result
    seg = dcmread(result["seg_file"])
    assert seg.StudyInstanceUID == study.study_instance_uid
    assert seg.SeriesDescription == "Dafne leg g1"
    decoded = decode_segmentation(seg, LEG_MUSCLES,
                                  [SourceFrame(uid) for uid in study.sop_instance_uids])
    scores = dice_per_label(decoded.label_map, study.labels, [lbl.value for lbl in LEG_MUSCLES])
    assert mean_dice(scores) >= 0.90, scores
    assert result["status"]["jobs"]["done"] == 1
    assert result["status"]["instances_received"] == 40
    assert result["latency_s"] < 60
    # SIGTERM: a clean stop, exit code 0, the stop logged.
    assert result["exit_code"] == 0, result["log"]
    assert "stopped" in result["log"]


# --------------------------------------------------------------------------------------------
# driver side (inside the namespace)


def _start_node(work: Path) -> Any:
    node = spawn("dafne-node", [
        DAFNE_NODE, "--log-level", "info", "serve", "--data-dir", str(work / "node"),
        "--dest", "ORTHANC@127.0.0.1:4242", "--quiet-period", str(QUIET_PERIOD),
    ], work / "node.log")
    wait_for(lambda: echoscu(NODE_PORT, aec=NODE_AET, timeout=2), 90, interval=0.5,
             what="the Dafne node answering C-ECHO")
    return node


def _seg_series(orthanc: OrthancProcess) -> list[dict[str, Any]]:
    return orthanc.find_series(modality="SEG")


def _drive_e2e(work: Path, images: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    with start_orthanc(work / "orthanc", node_port=NODE_PORT) as orthanc:
        node = _start_node(work)
        try:
            pushed_at = time.monotonic()
            storescu([images], port=4242)
            found = wait_for(lambda: _seg_series(orthanc), 180, interval=0.5,
                             what="a SEG series in Orthanc")
            latency = time.monotonic() - pushed_at
            instance = orthanc.series_instances(found[0]["ID"])[0]
            seg_file = work / "seg-from-orthanc.dcm"
            seg_file.write_bytes(orthanc.instance_file(instance["ID"]))
            status = json.loads(_node_status(work))
        finally:
            exit_code = node.stop()
        return {"seg_series": len(found), "seg_file": str(seg_file), "status": status,
                "latency_s": round(latency, 2), "exit_code": exit_code,
                "log": node.log_tail(3000)}


def _node_status(work: Path) -> str:
    import subprocess  # noqa: PLC0415

    return subprocess.run([DAFNE_NODE, "status", "--data-dir", str(work / "node"), "--json"],
                          capture_output=True, text=True, check=True, timeout=60).stdout


if __name__ == "__main__":
    mode, work_dir, image_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "e2e":
        emit_result(_drive_e2e(work_dir, image_dir))
