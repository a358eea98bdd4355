#!/usr/bin/env python3
"""Ingest benchmark: dcmtk storescu into our Storage SCP versus into dcmtk's storescp.

Both receivers get the same files from the same sender (``/usr/bin/storescu``, with
``TCP_NODELAY=1`` for dcmtk on both sides) in alternating rounds of the same run, so the
ratio is meaningful even on a busy machine. Ours runs in its own process exactly as the
node does: fsync'ed spool, SQLite (WAL) or PostgreSQL index, acknowledgement only after
both. At the end every instance is checked: all stored, all indexed, none lost.

Examples::

    .venv/bin/python bench/ingest.py                        # 500 MR 256x256, 1 association
    .venv/bin/python bench/ingest.py --node                 # into `dafne-node serve` itself
    .venv/bin/python bench/ingest.py --associations 4 --count 1000   # 4 x 250 concurrently
    .venv/bin/python bench/ingest.py --db postgresql+psycopg://postgres@127.0.0.1/test
    git worktree add /tmp/before HEAD~3 && .venv/bin/python bench/ingest.py --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import text
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from db import SqlInstanceIndex, make_engine, session_scope, upgrade  # noqa: E402
from db.repository import count_instances  # noqa: E402
from dicom_scp.receiver import StorageServer  # noqa: E402
from dicom_scp.spool import Spool  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
OUR_AE = "DAFNE"
DCMTK_AE = "STORESCP"
CALLING_AE = "BENCHSCU"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s")


def generate_files(folder: Path, count: int, size: int = 256) -> list[Path]:
    """Write ``count`` MR images (``size`` x ``size``, 16 bit) of one series."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in tqdm(range(count), desc="generating MR files", unit="file"):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyDate = "20240101"
        ds.Modality = "MR"
        ds.SeriesDescription = "t1_tse_tra_leg"
        ds.PatientName = "Bench^Ingest"
        ds.PatientID = "BENCH001"
        ds.BodyPartExamined = "LEG"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 1
        ds.InstanceNumber = number + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(number) * 5.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 5.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        path = folder / f"{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _dcmtk_env() -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1")


def push(groups: list[list[Path]], ae_title: str, port: int) -> float:
    """Run one storescu per group at once; return the wall time until all finished."""
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            [STORESCU, "-aet", CALLING_AE, "-aec", ae_title, "127.0.0.1", str(port)]
            + [str(path) for path in group],
            env=_dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group in groups
    ]
    failures = []
    for sender in senders:
        _, err = sender.communicate()
        if sender.returncode != 0:
            failures.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError("storescu failed:\n" + "\n".join(failures))
    return elapsed


@dataclass
class Round:
    receiver: str
    seconds: float
    images: int
    stored: int
    indexed: int | None
    cpu_s: float | None = None
    disk_flush_ms: float | None = None

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def flush_latency_ms(folder: Path, samples: int = 20) -> float:
    """Median time to write and fdatasync a new 128 KiB file: the disk's flush cost."""
    data = os.urandom(128 * 1024)
    times = []
    for number in range(samples):
        path = folder / f"flush-probe-{number}"
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        times.append(time.perf_counter() - start)
        path.unlink()
    return statistics.median(times) * 1000


def run_storescp(groups: list[list[Path]], work: Path) -> Round:
    out = Path(tempfile.mkdtemp(prefix="storescp-", dir=work))
    port = free_port()
    before = _children_cpu()
    server = subprocess.Popen(
        [STORESCP, "-aet", DCMTK_AE, "-od", str(out), str(port)],
        env=_dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        seconds = push(groups, DCMTK_AE, port)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    stored = sum(1 for _ in out.iterdir())
    # storescu's CPU is in there too (small: it reads files and sends)
    cpu = _children_cpu() - before
    return Round("storescp", seconds, sum(map(len, groups)), stored, None, cpu)


def _python_of(tree: Path) -> str:
    venv = tree / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_ours(
    groups: list[list[Path]], work: Path, args: argparse.Namespace, tree: Path = ROOT,
    label: str = "dafne",
) -> Round:
    data = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=work))
    port = free_port()
    command = [_python_of(tree), str(tree / "bench" / "ingest.py"), "serve"]
    command += ["--data-dir", str(data), "--port", str(port)]
    command += ["--sqlite-synchronous", args.sqlite_synchronous]
    if args.db:
        command += ["--db", args.db, "--schema", f"bench_{os.getpid()}_{port}"]
    if args.no_fsync:
        command.append("--no-fsync")
    if args.stock_pynetdicom:
        command.append("--stock-pynetdicom")
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        ready = server.stdout.readline() if server.stdout else ""
        if not ready.startswith("READY"):
            raise RuntimeError(f"receiver did not start: {ready!r}")
        seconds = push(groups, OUR_AE, port)
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
    stats = json.loads(output.strip().splitlines()[-1])
    return Round(
        label, seconds, sum(map(len, groups)), stats["files"], stats["indexed"], stats["cpu_s"]
    )


def _process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a running process, from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_node(groups: list[list[Path]], work: Path, args: argparse.Namespace) -> Round:
    """The whole node, ``dafne-node serve`` on its defaults, as a hospital runs it.

    Unlike ``run_ours`` it runs everything else the node runs beside the receiver (series
    assembler, segmentation worker, outbox, admin API), so it shows what they cost.
    """
    data = Path(tempfile.mkdtemp(prefix="node-", dir=work))
    port = free_port()
    command = [str(Path(sys.executable).with_name("dafne-node")), "serve", "--data-dir",
               str(data), "--port", str(port), "--http-port", str(free_port())]
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        ready = server.stdout.readline() if server.stdout else ""
        if not ready.startswith("Dafne node"):
            raise RuntimeError(f"dafne-node serve did not start: {ready!r}")
        before = _process_cpu_s(server.pid)
        seconds = push(groups, OUR_AE, port)
        cpu = _process_cpu_s(server.pid) - before
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    engine = make_engine(data / "dafne.db")
    with session_scope(engine) as session:
        indexed = count_instances(session)
    engine.dispose()
    stored = sum(1 for _ in Spool(data / "spool").iter_files())
    return Round("node", seconds, sum(map(len, groups)), stored, indexed, cpu)


def serve(args: argparse.Namespace) -> int:
    """Child process: our receiver on its own, as the node runs it."""
    logging.basicConfig(level=logging.ERROR)
    data = Path(args.data_dir)
    if args.db:
        admin = make_engine(args.db)
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{args.schema}"'))
        admin.dispose()
        engine = make_engine(args.db, schema=args.schema)
    else:
        engine = make_engine(data / "node.db", sqlite_synchronous=args.sqlite_synchronous)
    upgrade(engine)
    spool = Spool(data / "spool", durable=not args.no_fsync)
    index = SqlInstanceIndex(engine)
    server = StorageServer(
        ae_title=OUR_AE,
        host="127.0.0.1",
        port=args.port,
        spool=spool,
        index=index,
        event_driven=not args.stock_pynetdicom,
    )
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server.start()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    startup_cpu = usage.ru_utime + usage.ru_stime
    print(f"READY {server.port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - startup_cpu
    server.stop()
    index.close()
    with session_scope(engine) as session:
        indexed = count_instances(session)
    if args.db:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{args.schema}" CASCADE'))
    engine.dispose()
    files = sum(1 for _ in spool.iter_files())
    print(json.dumps({"files": files, "indexed": indexed, "cpu_s": round(cpu, 3)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("serve", help="(internal) run only our receiver")
    child.add_argument("--data-dir", required=True)
    child.add_argument("--port", type=int, required=True)
    child.add_argument("--db")
    child.add_argument("--schema", default="bench")
    child.add_argument("--sqlite-synchronous", default="FULL")
    child.add_argument("--no-fsync", action="store_true")
    child.add_argument("--stock-pynetdicom", action="store_true")

    parser.add_argument("--files", type=Path, help="folder of DICOM files (default: generate)")
    parser.add_argument("--count", type=int, default=500, help="files to generate (500)")
    parser.add_argument("--associations", type=int, default=1, help="concurrent storescu (1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--db", help="database URL for our index (default: SQLite file)")
    parser.add_argument(
        "--sqlite-synchronous", default="FULL", help="SQLite PRAGMA synchronous (FULL)"
    )
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync (for comparison)")
    parser.add_argument(
        "--stock-pynetdicom",
        action="store_true",
        help="use pynetdicom's own association loops (for comparison)",
    )
    parser.add_argument(
        "--node",
        action="store_true",
        help="push into the whole node (`dafne-node serve` on its defaults) instead of its "
        "receiver alone",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="another checkout of this project (e.g. made with `git worktree add`) whose "
        "receiver also runs in every round, to compare two versions in one run",
    )
    parser.add_argument("--workdir", type=Path, help="where to put files (default: temp)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.node and (args.db or args.no_fsync or args.stock_pynetdicom):
        parser.error("--node runs the node on its defaults; --db, --no-fsync and "
                     "--stock-pynetdicom apply to the receiver alone")

    for tool in (STORESCU, STORESCP):
        if not Path(tool).exists():
            parser.error(f"{tool} not found (install dcmtk)")
    with tempfile.TemporaryDirectory(prefix="ingest-", dir=args.workdir) as tmp:
        work = Path(tmp)
        if args.files:
            files = sorted(path for path in args.files.rglob("*") if path.is_file())
        else:
            files = generate_files(work / "input", args.count)
        groups = [files[i :: args.associations] for i in range(args.associations)]
        rounds: list[Round] = []
        ours = (lambda g, w: run_node(g, w, args)) if args.node else (
            lambda g, w: run_ours(g, w, args))
        runners = [run_storescp, ours]
        if args.baseline:
            baseline = args.baseline.resolve()
            runners.append(lambda g, w: run_ours(g, w, args, baseline, "baseline"))
        steps = tqdm(total=len(runners) * args.rounds, desc="rounds", unit="run")
        for _ in range(args.rounds):
            for runner in runners:
                flush = flush_latency_ms(work, samples=7)  # the disk's state varies
                result = runner(groups, work)
                result.disk_flush_ms = round(flush, 2)
                rounds.append(result)
                steps.set_postfix_str(f"{result.receiver} {result.rate:.0f}/s")
                steps.update()
        steps.close()

    ours = [r for r in rounds if r.receiver in ("dafne", "node")]
    theirs = [r for r in rounds if r.receiver == "storescp"]
    base = [r for r in rounds if r.receiver == "baseline"]
    ratios = [o.rate / t.rate for o, t in zip(ours, theirs, strict=True)]
    summary = {
        "images": len(files),
        "associations": args.associations,
        "rounds": [asdict(r) | {"rate": round(r.rate, 1)} for r in rounds],
        "storescp_median_per_s": round(statistics.median(r.rate for r in theirs), 1),
        "dafne_median_per_s": round(statistics.median(r.rate for r in ours), 1),
        "ratio_median": round(statistics.median(ratios), 3),
        "all_stored": all(r.stored == r.images for r in rounds),
        "all_indexed": all(r.indexed == r.images for r in ours + base),
        "fsync": not args.no_fsync,
        "disk_flush_ms_median": round(statistics.median(r.disk_flush_ms or 0 for r in rounds), 2),
        "index": args.db.split("@")[-1] if args.db else f"sqlite ({args.sqlite_synchronous})",
    }
    print("disk flush = write + fdatasync of a new 128 KiB file, measured before each run")
    for r in rounds:
        indexed = "" if r.indexed is None else f", {r.indexed} indexed"
        cpu = "" if r.cpu_s is None else f", {1000 * r.cpu_s / r.images:.2f} ms CPU/image"
        print(
            f"{r.receiver:9s} {r.rate:7.1f} images/s  ({r.stored}/{r.images} stored{indexed}"
            f"{cpu}; disk flush {r.disk_flush_ms:.2f} ms)"
        )
    print(
        f"median: storescp {summary['storescp_median_per_s']}/s, dafne "
        f"{summary['dafne_median_per_s']}/s, ratio {summary['ratio_median']} "
        f"(per-round ratios {', '.join(f'{x:.2f}' for x in ratios)})"
    )
    if base:
        speedups = [o.rate / b.rate for o, b in zip(ours, base, strict=True)]
        summary["baseline"] = str(args.baseline)
        summary["baseline_median_per_s"] = round(statistics.median(r.rate for r in base), 1)
        summary["speedup_over_baseline_median"] = round(statistics.median(speedups), 3)
        print(
            f"baseline {args.baseline}: {summary['baseline_median_per_s']}/s; this checkout "
            f"is {summary['speedup_over_baseline_median']}x as fast "
            f"(per round {', '.join(f'{x:.2f}' for x in speedups)})"
        )
    print(f"all stored: {summary['all_stored']}, all indexed: {summary['all_indexed']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if summary["all_stored"] and summary["all_indexed"] else 1


if __name__ == "__main__":
    sys.exit(main())
