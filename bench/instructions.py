#!/usr/bin/env python3
"""Instructions per C-STORE in the receiver, counted by callgrind: a repeatable comparison.

Wall-clock ingest rates on a shared VM swing by ±30 % from round to round
(``bench/ingest.py``); instruction counts do not. This runs the Storage SCP (SQLite index,
durable spool) under ``valgrind --tool=callgrind`` twice per checkout, receiving ``--small``
and then ``--count + --small`` C-STOREs (256x256 MR, one association, from a raw socket
peer), and reports the difference divided by ``--count``: the instructions one C-STORE
costs the receiver, all its threads, start-up excluded.

Examples::

    .venv/bin/python bench/instructions.py                                 # this checkout
    git worktree add /tmp/before 856a9c9
    .venv/bin/python bench/instructions.py --baseline /tmp/before          # and the ratio
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"


def serve(checkout: Path, port: int) -> None:
    """The receiver of ``checkout`` on ``port`` until SIGTERM (run under callgrind)."""
    sys.path.insert(0, str(checkout))
    from db import SqlInstanceIndex, make_engine, upgrade  # noqa: PLC0415
    from dicom_scp.receiver import StorageServer  # noqa: PLC0415
    from dicom_scp.spool import Spool  # noqa: PLC0415

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    work = Path(tempfile.mkdtemp(prefix="dafne-instructions-"))
    engine = make_engine(work / "index.db")
    upgrade(engine)
    server = StorageServer(ae_title="DAFNE", host="127.0.0.1", port=port,
                           spool=Spool(work / "spool"), index=SqlInstanceIndex(engine))
    server.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM})
    server.stop()


def _dataset(uid: str) -> bytes:
    from pydicom.dataset import Dataset  # noqa: PLC0415
    from pydicom.filebase import DicomBytesIO  # noqa: PLC0415
    from pydicom.filewriter import write_dataset  # noqa: PLC0415

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MR, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.1", "1.2.826.0.1.3680043.2"
    ds.Modality, ds.Rows, ds.Columns, ds.BitsAllocated = "MR", 256, 256, 16
    ds.PixelData = bytes(256 * 256 * 2)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def count_instructions(checkout: Path, stores: int, out: Path) -> int:
    """Total instructions of the receiver of ``checkout`` serving ``stores`` C-STOREs."""
    from pydicom.uid import generate_uid  # noqa: PLC0415

    from deploy.rawpeer import RawPeer, c_store, response_status  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         __file__, "--serve", str(checkout), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=checkout,
        env=dict(os.environ, PYTHONPATH=str(checkout)))
    assert process.stdout is not None
    process.stdout.readline()
    with RawPeer(port, timeout=120) as peer:
        peer.associate([(MR, [EXPLICIT])], max_pdu=1024 * 1024)
        for number in range(stores):
            uid = generate_uid()
            answer = response_status(c_store(peer, 1, MR, uid, _dataset(uid),
                                             message_id=number + 1, fragment=1_000_000))
            if not answer or answer[0] != 0:
                raise RuntimeError(f"C-STORE {number} answered {answer}")
        peer.release()
    time.sleep(1)
    process.terminate()
    process.wait(300)
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="C-STOREs measured (200)")
    parser.add_argument("--small", type=int, default=20, help="C-STOREs of the reference run")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    checkouts = {"this checkout": ROOT}
    if args.baseline:
        checkouts["baseline"] = args.baseline.resolve()
    work = Path(tempfile.mkdtemp(prefix="dafne-callgrind-"))
    per_store = {}
    with tqdm(total=2 * len(checkouts), desc="callgrind runs", unit="run") as progress:
        for name, checkout in checkouts.items():
            small = count_instructions(checkout, args.small, work / f"{len(per_store)}.small")
            progress.update()
            total = count_instructions(checkout, args.small + args.count,
                                       work / f"{len(per_store)}.big")
            progress.update()
            per_store[name] = (total - small) / args.count
    for name, value in per_store.items():
        print(f"{name:<14} {value / 1e6:.3f} M instructions per C-STORE")
    if args.baseline:
        ratio = per_store["this checkout"] / per_store["baseline"]
        print(f"this checkout / baseline: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
