"""Benchmark: from series complete to SEG accepted by Orthanc, for a 40-slice series.

Runs inside a private network namespace (Orthanc binds every interface): Orthanc as the PACS,
``dafne-node serve`` with Orthanc as its destination, dcmtk's ``storescu`` pushing phantom
series straight to the node. For each series the node's own database gives the moment the
series was complete (quiet period over) and the moment Orthanc answered the SEG's C-STORE with
success; their difference is the latency reported (the quiet period itself is excluded).

    .venv/bin/python bench/latency.py --series 5
    .venv/bin/python bench/latency.py --series 5 --during-training

``--during-training`` measures the same series twice in one run: first with the trainer
idle, then while it trains (an always-open window; the corrections are the phantoms' truth
SEGs of three site-C series, sent to the node as a viewer would), and reports the ratio.

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
from typing import Any

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
TRAINING_SERIES = 3
TRAINING_CONFIG = """
[training]
min_new_examples = 3
steps = 400
threads = 1
check_every_s = 1

[[training.windows]]
name = "always"
cron = "* * * * *"
max_duration_h = 24
"""
DAFNE_NODE = str(Path(sys.executable).with_name("dafne-node"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=5, help="series to push, one at a time")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--during-training", action="store_true",
                        help="measure idle, then while the trainer process trains")
    args = parser.parse_args()

    from tqdm import tqdm  # noqa: PLC0415

    from dafne_node.phantom import make_study  # noqa: PLC0415
    from dafne_node.phantom.study import write_study  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="dafne-latency-"))
    folders = []
    for n in tqdm(range(args.series), desc="writing phantoms"):
        study = make_study(site="A", seed=300 + n, slices=args.slices)
        folders.append(write_study(study, work / f"study{n}").images[0].parent)
    if not args.during_training:
        completed = run_in_netns(__file__, ["drive", str(work), *map(str, folders)],
                                 timeout=600)
        _table(args, {"idle": driver_result(completed)["latencies_s"]})
        return
    corrected = []
    for n in tqdm(range(TRAINING_SERIES), desc="writing site-C phantoms"):
        files = write_study(make_study(site="C", seed=3200 + n, slices=args.slices),
                            work / f"corrected{n}")
        corrected.append(f"{files.images[0].parent}={files.truth}")
    completed = run_in_netns(__file__, ["train", str(work), *corrected, "--",
                                        *map(str, folders)], timeout=1800)
    _table(args, driver_result(completed))


def _table(args: argparse.Namespace, result: dict[str, Any]) -> None:
    runs = {name: result[name] for name in ("idle", "training") if name in result}
    print(f"\n{args.series} series of {args.slices} slices (256x256) per column, quiet period "
          f"{QUIET_PERIOD_S:.0f} s excluded\n")
    names = list(runs)
    print("| series complete -> SEG accepted by Orthanc | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, summary in (("median", statistics.median), ("max", max)):
        print(f"| {label} | " + " | ".join(f"{summary(runs[n]):.2f} s" for n in names) + " |")
    print("| all | " + " | ".join(", ".join(f"{v:.2f}" for v in runs[n]) for n in names)
          + " |")
    if "training" in runs:
        ratio = statistics.median(runs["training"]) / statistics.median(runs["idle"])
        print(f"\nmedian during training / median idle: **{ratio:.2f}x** (the trainer was "
              f"{'still' if result['trained_throughout'] else 'no longer'} training at the end)")


def _start_node(work: Path, config: str) -> Any:
    (work / "node.toml").write_text(config)
    node = spawn("dafne-node", [
        DAFNE_NODE, "serve", "--data-dir", str(work / "node"), "--config", str(work / "node.toml"),
        "--dest", "ORTHANC@127.0.0.1:4242", "--quiet-period", str(QUIET_PERIOD_S),
    ], work / "node.log")
    wait_for(lambda: echoscu(NODE_PORT, aec="DAFNE", timeout=2), 120, interval=0.5,
             what="the node")
    return node


def _push_one_by_one(orthanc: Any, folders: list[Path], already: int) -> None:
    for done, folder in enumerate(folders, start=already + 1):
        storescu([folder], port=NODE_PORT, aec="DAFNE")
        wait_for(lambda n=done: len(orthanc.find_series(modality="SEG")) >= n, 300,
                 interval=0.2, what=f"SEG number {done} in Orthanc")


def _drive(work: Path, folders: list[Path]) -> dict[str, object]:
    with start_orthanc(work / "orthanc", node_port=NODE_PORT) as orthanc:
        node = _start_node(work, "[training]\nenabled = false\n")
        try:
            _push_one_by_one(orthanc, folders, 0)
            time.sleep(1)
        finally:
            node.stop()
    return {"latencies_s": _latencies(work)}


def _drive_training(work: Path, corrected: list[str], folders: list[Path]) -> dict[str, object]:
    """Idle latencies, then the same series again while the trainer trains."""
    with start_orthanc(work / "orthanc", node_port=NODE_PORT) as orthanc:
        node = _start_node(work, TRAINING_CONFIG)
        try:
            images = [Path(pair.split("=")[0]) for pair in corrected]
            _push_one_by_one(orthanc, images, 0)
            _push_one_by_one(orthanc, folders, len(images))
            for pair in corrected:  # the radiologists' corrections come back
                storescu([pair.split("=")[1]], port=NODE_PORT, aec="DAFNE", aet="VIEWER")
            wait_for(lambda: _training_state(work) == "running", 600, interval=0.5,
                     what="training to start")
            again = []
            for folder in folders:  # new instances of the same studies, pushed during training
                copy = work / "again" / folder.parent.name
                _renumbered_copy(folder, copy)
                again.append(copy)
            _push_one_by_one(orthanc, again, len(images) + len(folders))
            still_training = _training_state(work) == "running"
        finally:
            node.stop(timeout=60)
    # Pushed in this order: the site-C series, the series idle, their copies in training.
    latencies = _latencies(work)[len(images):]
    return {"idle": latencies[:len(folders)], "training": latencies[len(folders):],
            "trained_throughout": still_training}


def _training_state(work: Path) -> str | None:
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    done = subprocess.run([DAFNE_NODE, "status", "--json", "--data-dir", str(work / "node")],
                          capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)["training"]["current_state"]


def _renumbered_copy(folder: Path, target: Path) -> None:
    """The study as a new series (new UIDs), so the node segments it again."""
    from pydicom import dcmread  # noqa: PLC0415
    from pydicom.uid import generate_uid  # noqa: PLC0415

    target.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for path in sorted(folder.glob("*.dcm")):
        ds = dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(target / path.name)


def _latencies(work: Path) -> list[float]:
    """Seconds from series complete to SEG sent, for every segmented series in push order."""
    with sqlite3.connect(work / "node" / "dafne.db") as database:
        rows = database.execute(
            "SELECT s.completed_at, o.sent_at FROM outbox o JOIN jobs j ON o.job_id = j.id "
            "JOIN series s ON j.series_id = s.id WHERE o.state = 'sent' ORDER BY s.id"
        ).fetchall()
    return [round(_time(sent) - _time(complete), 3) for complete, sent in rows]


def _time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "drive":
        emit_result(_drive(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]))
    elif len(sys.argv) > 1 and sys.argv[1] == "train":
        split = sys.argv.index("--")
        emit_result(_drive_training(Path(sys.argv[2]), sys.argv[3:split],
                                    [Path(p) for p in sys.argv[split + 1:]]))
    else:
        main()
