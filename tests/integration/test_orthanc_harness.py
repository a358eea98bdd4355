"""The harness and the deploy Orthanc configuration against real peers, no Dafne node involved.

dcmtk's storescp stands in for the node (AE DAFNE). What is proven here is what the node's own
end-to-end tests rely on: the PACS configuration in ``deploy/orthanc/`` routes a stable MR series
to the node automatically and completely, routes no SEG (neither a viewer's nor the node's own,
unless correction routing is switched on), and accepts the node's SEG back into the same study.

This module is also the driver: ``run_in_netns`` executes it as a script inside a fresh network
namespace (``python test_orthanc_harness.py MODE WORKDIR ...``), and it prints one JSON line.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from deploy.netns import (
    NODE_AET,
    OrthancProcess,
    driver_result,
    echoscu,
    emit_result,
    run_in_netns,
    start_orthanc,
    start_storescp,
    storescu,
    wait_for,
)

if TYPE_CHECKING:  # the driver side must not pay for the phantom's imports
    from tests.integration.conftest import PhantomFiles

NODE_PORT = 11112
STABLE_AGE = 2
DRIVER_TIMEOUT = 60.0


# --------------------------------------------------------------------------------------------
# pytest side: prepare files, run the driver in a namespace, check what came back


def _run(mode: str, phantom: PhantomFiles, tmp_path: Path) -> dict[str, Any]:
    started = time.monotonic()
    completed = run_in_netns(__file__, [mode, tmp_path / "work", phantom.images[0].parent,
                                        phantom.truth, phantom.viewer_seg],
                             timeout=DRIVER_TIMEOUT)
    result = driver_result(completed)
    result["wall_s"] = round(time.monotonic() - started, 2)
    return result


def test_mr_series_is_routed_to_node_and_seg_comes_back(phantom: PhantomFiles,
                                                        tmp_path: Path) -> None:
    result = _run("route", phantom, tmp_path)
    images = phantom.images
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in images]

    # The stable MR series reached the node, every instance of it.
    assert sorted(result["routed_sop_uids"]) == sorted(ds.SOPInstanceUID for ds in sources)
    assert all(name.startswith("MR.") for name in result["routed_files"])
    [job] = result["jobs"]
    assert job["State"] == "Success"
    assert job["Content"]["InstancesCount"] == len(images)
    assert job["Content"]["RemoteAet"] == NODE_AET
    assert job["Content"]["ParentResources"] == [result["mr_series_id"]]

    # Neither SEG was routed, and the script said why.
    assert result["viewer_seg_skip"] == "modality SEG from VIEWER"
    assert result["node_seg_skip"] == f"stored by {NODE_AET}"

    # The node may echo and store: its SEG is in the MR study, with its own SOP Instance UID.
    assert result["node_echo"] is True
    assert result["node_seg_study"] == result["mr_study"]
    assert result["study_instance_uid"] == sources[0].StudyInstanceUID
    assert result["node_seg_sop_uid"] == pydicom.dcmread(phantom.truth).SOPInstanceUID
    assert result["orthanc_exit"] == 0  # clean shutdown


def test_correction_routing_sends_viewer_seg_but_never_the_nodes_own(phantom: PhantomFiles,
                                                                     tmp_path: Path) -> None:
    result = _run("corrections", phantom, tmp_path)

    [job] = result["jobs"]
    assert job["State"] == "Success"
    assert job["Content"]["ParentResources"] == [result["viewer_seg_series_id"]]
    assert result["routed_sop_uids"] == [pydicom.dcmread(phantom.viewer_seg).SOPInstanceUID]
    assert result["node_seg_skip"] == f"stored by {NODE_AET}"
    assert result["orthanc_exit"] == 0


# --------------------------------------------------------------------------------------------
# driver side: runs inside the namespace


def _skip_reason(orthanc: OrthancProcess, series_id: str) -> str | None:
    """Why the routing script skipped ``series_id``; None until it decided (or if it routed)."""
    decision = orthanc.routing_decisions().get(series_id)
    return decision.reason if decision and not decision.routed else None


def _routed_job_done(orthanc: OrthancProcess, series_id: str) -> dict[str, Any] | None:
    for job in orthanc.jobs():
        if series_id in job["Content"].get("ParentResources", []):
            if job["State"] == "Failure":
                raise RuntimeError(f"routing job failed: {job}\n{orthanc.log_tail()}")
            if job["State"] == "Success":
                return job
    return None


def _one_series(orthanc: OrthancProcess, path: Path) -> dict[str, Any]:
    uid = pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
    return wait_for(lambda: orthanc.find_series(series_instance_uid=uid), 10,
                    what=f"series {uid} in Orthanc")[0]


def _drive(mode: str, work: Path, images: Path, node_seg: Path, viewer_seg: Path) -> None:
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - clock, 2)

    node_dir = work / "node"
    node = start_storescp(node_dir, NODE_PORT, aet=NODE_AET)
    try:
        orthanc = start_orthanc(work / "pacs", node_port=NODE_PORT, stable_age=STABLE_AGE,
                                route_corrections=mode == "corrections")
        lap("started")
        try:
            result = _exercise(mode, orthanc, node_dir, images, node_seg, viewer_seg, lap)
        finally:
            orthanc_exit = orthanc.stop()
            lap("stopped")
    finally:
        node.stop()
    result.update(orthanc_exit=orthanc_exit, timings=timings)
    emit_result(result)


def _exercise(mode: str, orthanc: OrthancProcess, node_dir: Path, images: Path,
              node_seg: Path, viewer_seg: Path,
              lap: Callable[[str], None]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if mode == "route":
        # The scanner's series and a viewer's SEG arrive together, so they stabilise together.
        storescu([images], port=orthanc.dicom_port, aet="SCANNER")
        storescu([viewer_seg], port=orthanc.dicom_port, aet="VIEWER")
        lap("pushed")
        mr = _one_series(orthanc, next(images.iterdir()))
        viewer = _one_series(orthanc, viewer_seg)
        wait_for(lambda: _routed_job_done(orthanc, mr["ID"]), 30, interval=0.2,
                 what="the MR series routed to the node")
        lap("mr_routed")
        result["viewer_seg_skip"] = wait_for(lambda: _skip_reason(orthanc, viewer["ID"]), 15,
                                             interval=0.2, what="viewer SEG decision")
        result.update(mr_series_id=mr["ID"], mr_study=mr["ParentStudy"])
        result["study_instance_uid"] = orthanc.get(
            f"/studies/{mr['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]

    # The node answers: C-ECHO and C-STORE of its SEG from AE DAFNE.
    result["node_echo"] = echoscu(orthanc.dicom_port, aet=NODE_AET)
    storescu([node_seg], port=orthanc.dicom_port, aet=NODE_AET)
    if mode == "corrections":
        storescu([viewer_seg], port=orthanc.dicom_port, aet="VIEWER")
    lap("seg_stored")
    seg = _one_series(orthanc, node_seg)
    [seg_instance] = orthanc.series_instances(seg["ID"])
    stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(seg_instance["ID"])),
                             stop_before_pixels=True)
    result.update(node_seg_study=seg["ParentStudy"], node_seg_sop_uid=stored.SOPInstanceUID)
    if mode == "corrections":
        viewer = _one_series(orthanc, viewer_seg)
        result["viewer_seg_series_id"] = viewer["ID"]
        wait_for(lambda: _routed_job_done(orthanc, viewer["ID"]), 30, interval=0.2,
                 what="the viewer's SEG routed to the node")
    result["node_seg_skip"] = wait_for(lambda: _skip_reason(orthanc, seg["ID"]), 15,
                                       interval=0.2, what="node SEG decision")
    lap("seg_decided")

    result["jobs"] = orthanc.jobs()
    result["routed_files"] = sorted(p.name for p in node_dir.iterdir())
    result["routed_sop_uids"] = [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in sorted(node_dir.iterdir())]
    return result


if __name__ == "__main__":
    _drive(sys.argv[1], *(Path(a) for a in sys.argv[2:6]))
