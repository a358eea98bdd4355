"""The main job, end to end, on the embedded defaults: PACS in, SEG back in PACS.

Starts Orthanc (the PACS, configured from deploy/orthanc/) and ``dafne-node serve`` (SQLite,
local spool, bundled model), writes a synthetic lower-leg MR study, pushes it into Orthanc with
dcmtk's ``storescu`` as a modality would, and waits until Orthanc has routed the series to the
node and the node's DICOM-SEG is stored in the same study in Orthanc. Every command is printed
so it can be repeated by hand. Run by ``deploy/demo.sh`` inside a private network namespace,
because Orthanc listens on every interface.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.netns import echoscu, spawn, start_orthanc, wait_for  # noqa: E402

BIN = Path(sys.executable).parent
NODE = str(BIN / "dafne-node")


def show(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Print a command as a user would type it, run it, echo its output."""
    print(f"\n$ {shlex.join(command)}", flush=True)
    done = subprocess.run(command, text=True, capture_output=True, check=False, timeout=300)
    print(done.stdout.rstrip(), flush=True)
    if done.returncode != 0:
        print(done.stderr.rstrip(), file=sys.stderr, flush=True)
        raise SystemExit(f"demo: {command[0]} failed with exit code {done.returncode}")
    return done


def main(work: Path) -> None:
    """Run the demo in ``work``."""
    print(f"Demo folder: {work}")
    print("\n# 1. The PACS: Orthanc with deploy/orthanc/orthanc.json, routing MR to DAFNE:11112")
    with start_orthanc(work / "orthanc", stable_age=2) as orthanc:
        print(f"Orthanc is up: DICOM ORTHANC@127.0.0.1:4242, REST {orthanc.url}")
        print("\n# 2. The node on its defaults, SEGs to Orthanc")
        serve = [NODE, "--log-level", "info", "serve", "--data-dir", str(work / "node"),
                 "--dest", "ORTHANC@127.0.0.1:4242", "--quiet-period", "3"]
        print(f"$ {shlex.join(serve)} &")
        node = spawn("dafne-node", serve, work / "node.log")
        try:
            wait_for(lambda: echoscu(11112, aec="DAFNE", timeout=2), 120, interval=0.5,
                     what="the Dafne node")
            show([NODE, "echo", "DAFNE@127.0.0.1:11112"])
            print("\n# 3. A synthetic lower-leg MR study, pushed into PACS by a 'modality'")
            show([NODE, "phantom", "--out", str(work / "leg"), "--site", "A", "--seed", "7"])
            pushed = time.monotonic()
            show(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "+sd", "+r",
                  "127.0.0.1", "4242", str(work / "leg" / "images")])
            print("\n# 4. Orthanc routes the stable series to the node; the SEG comes back")
            found = wait_for(lambda: orthanc.find_series(modality="SEG"), 180, interval=0.5,
                             what="the node's SEG in Orthanc")
            tags = found[0]["MainDicomTags"]
            print(f"SEG in Orthanc after {time.monotonic() - pushed:.1f} s: series "
                  f"'{tags.get('SeriesDescription')}' {tags.get('SeriesInstanceUID')}")
            instance = orthanc.series_instances(found[0]["ID"])[0]
            seg_file = work / "seg-from-orthanc.dcm"
            seg_file.write_bytes(orthanc.instance_file(instance["ID"]))
            print(f"$ curl {orthanc.url}/instances/{instance['ID']}/file > {seg_file}")
            show([NODE, "compare", str(seg_file), str(work / "leg" / "truth.seg.dcm")])
            show([NODE, "status", "--data-dir", str(work / "node")])
        finally:
            node.stop()
    print(f"\nDone. Node log: {work / 'node.log'}; Orthanc log: {work / 'orthanc' / 'orthanc.log'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
