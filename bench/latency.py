"""Benchmark: from series complete to SEG accepted by Orthanc, for a 40-slice series.

Runs inside a private network namespace (Orthanc binds every interface): Orthanc as the PACS,
``dafne-node serve`` with Orthanc as its destination, dcmtk's ``storescu`` pushing phantom
series straight to the node. For each series the node's own database gives the moment the
series was complete (quiet period over) and the moment Orthanc answered the SEG's C-STORE with
success; their difference is the latency reported (the quiet period itself is excluded).

    .venv/bin/python bench/latency.py --series 5

Needs root (``unshare -n``), Orthanc and dcmtk (``deploy/setup.sh``).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.netns import (  # noqa: E402 - path set up above
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
QUIET_PERIOD_S = 2.0
DAFNE_NODE = str(Path(sys.executable).with_name("dafne-node"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=5, help="series to push, one at a time")
    parser.add_argument("--slices", type=int, default=40)
    args = parser.parse_args()

    from tqdm import tqdm  # noqa: PLC0415

    from dafne_node.phantom import make_study  # noqa: PLC0415
    from dafne_node.phantom.study import write_study  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="dafne-latency-"))
    folders = []
    for n in tqdm(range(args.series), desc="writing phantoms"):
        study = make_study(site="A", seed=300 + n, slices=args.slices)
        folders.append(write_study(study, work / f"study{n}").images[0].parent)
    completed = run_in_netns(__file__, ["drive", str(work), *map(str, folders)], timeout=600)
    latencies = driver_result(completed)["latencies_s"]
    print(f"\n{args.series} series of {args.slices} slices (256x256), quiet period "
          f"{QUIET_PERIOD_S:.0f} s excluded\n")
    print("| series complete -> SEG accepted by Orthanc | seconds |")
    print("|---|---|")
    print(f"| median | {statistics.median(latencies):.2f} |")
    print(f"| max | {max(latencies):.2f} |")
    print(f"| all | {', '.join(f'{value:.2f}' for value in latencies)} |")


def _drive(work: Path, folders: list[Path]) -> dict[str, object]:
    with start_orthanc(work / "orthanc", node_port=NODE_PORT) as orthanc:
        node = spawn("dafne-node", [
            DAFNE_NODE, "serve", "--data-dir", str(work / "node"),
            "--dest", "ORTHANC@127.0.0.1:4242", "--quiet-period", str(QUIET_PERIOD_S),
        ], work / "node.log")
        try:
            wait_for(lambda: echoscu(NODE_PORT, aec="DAFNE", timeout=2), 120, interval=0.5,
                     what="the node")
            for done, folder in enumerate(folders, start=1):
                storescu([folder], port=NODE_PORT, aec="DAFNE")
                wait_for(lambda n=done: len(orthanc.find_series(modality="SEG")) >= n, 120,
                         interval=0.2, what=f"SEG number {done} in Orthanc")
            time.sleep(1)
        finally:
            node.stop()
    with sqlite3.connect(work / "node" / "dafne.db") as database:
        rows = database.execute(
            "SELECT s.completed_at, o.sent_at FROM outbox o JOIN jobs j ON o.job_id = j.id "
            "JOIN series s ON j.series_id = s.id WHERE o.state = 'sent'"
        ).fetchall()
    latencies = [(_time(sent) - _time(complete)) for complete, sent in rows]
    return {"latencies_s": [round(value, 3) for value in latencies]}


def _time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "drive":
        emit_result(_drive(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]))
    else:
        main()
