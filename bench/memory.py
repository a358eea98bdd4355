#!/usr/bin/env python3
"""Receiver memory: the node's resident memory with 16 associations at their worst.

Starts ``dafne-node serve`` (its defaults, the bundled model loaded, the DICOM port on
loopback) and reads its resident set size (``VmRSS``, and the peak ``VmHWM``, reset
between scenarios through ``/proc/PID/clear_refs``) while raw peers on loopback do the
worst a sender can do to its memory:

* ``largest``: N associations each send an instance just under the size limit, all held
  before their last fragment, then completed at once (stored, fsynced, indexed);
* ``oversize``: N associations each stream twice the limit (refused with 0xA700);
* ``bombs``: N associations each send a deflate bomb (1 MiB inflating to 1 GiB);
* ``idle``: 500 connections that never send an association request, from 50 addresses.

Examples::

    .venv/bin/python bench/memory.py                        # 16 associations, 256 MiB limit
    .venv/bin/python bench/memory.py --max-instance-mb 64 --associations 8
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy.rawpeer import (  # noqa: E402
    A_ASSOCIATE_AC_TYPE,
    RawPeer,
    command_set,
    pdata,
    response_status,
    store_request_elements,
)

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
FRAGMENT = 1024 * 1024 - 64
MiB = 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def header(uid: str, pixel_bytes: int) -> bytes:
    """An MR data set's header (explicit VR little endian) up to Pixel Data's length."""
    from pydicom.dataset import Dataset  # noqa: PLC0415
    from pydicom.filebase import DicomBytesIO  # noqa: PLC0415
    from pydicom.filewriter import write_dataset  # noqa: PLC0415

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MR, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.1", "1.2.826.0.1.2"
    ds.Modality = "CT"  # stored and indexed, but no route segments it
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, pixel_bytes)


def deflate_bomb(uid: str, inflated: int) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(MiB)
    parts = [deflater.compress(header(uid, inflated))]
    parts += [deflater.compress(zeros) for _ in range(inflated // MiB)]
    return b"".join(parts) + deflater.flush()


class Sender(threading.Thread):
    """One association: sends ``body`` as a C-STORE's data set, holding the last fragment
    until ``release`` is set."""

    def __init__(self, port: int, uid: str, head: bytes, body_bytes: int, syntax: str,
                 release: threading.Event, held: threading.Barrier) -> None:
        super().__init__(daemon=True)
        self.port, self.uid, self.head, self.body_bytes = port, uid, head, body_bytes
        self.syntax, self.release, self.held = syntax, release, held
        self.answer: tuple[int, str | None] | None = None

    def run(self) -> None:
        with RawPeer(self.port, timeout=600) as peer:
            if peer.associate([(MR, [self.syntax])], max_pdu=MiB).type != A_ASSOCIATE_AC_TYPE:
                raise RuntimeError("association refused")
            command = command_set(store_request_elements(MR, self.uid))
            peer.send(pdata(1, 0x03, command))
            peer.send(pdata(1, 0x00, self.head))
            zeros = bytes(FRAGMENT)
            remaining = self.body_bytes
            while remaining > FRAGMENT:
                peer.send(pdata(1, 0x00, zeros))
                remaining -= FRAGMENT
            self.held.wait()
            self.release.wait()
            peer.send(pdata(1, 0x02, bytes(remaining)))
            self.answer = response_status(peer.read_pdu(600))
            peer.release()


def run_scenario(pid: int, port: int, count: int, make: Callable[[str], tuple[bytes, int, str]]
                 ) -> dict[str, object]:
    """Run ``count`` senders; ``make(uid)`` gives each its first bytes, the number of
    bytes that follow and the transfer syntax."""
    reset_peak(pid)
    release = threading.Event()
    held = threading.Barrier(count + 1)
    senders = []
    for number in range(count):
        uid = f"1.2.826.0.1.3.{time.time_ns()}.{number}"
        head, body, syntax = make(uid)
        senders.append(Sender(port, uid, head, body, syntax, release, held))
    for sender in senders:
        sender.start()
    held.wait()
    time.sleep(0.5)
    in_flight = status_kib(pid, "VmRSS")
    release.set()
    for sender in senders:
        sender.join()
    return {"in_flight_mib": in_flight / 1024, "peak_mib": status_kib(pid, "VmHWM") / 1024,
            "answers": sorted({f"0x{a[0]:04X}" if a else "none" for a in
                               (s.answer for s in senders)})}


def idle_scenario(pid: int, port: int) -> dict[str, object]:
    reset_peak(pid)
    sockets = []
    for number in range(500):
        sock = socket.socket()
        sock.bind((f"127.0.1.{number % 50 + 1}", 0))
        sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    time.sleep(1.0)
    rss = status_kib(pid, "VmRSS") / 1024
    for sock in sockets:
        sock.close()
    return {"in_flight_mib": rss, "peak_mib": status_kib(pid, "VmHWM") / 1024,
            "answers": ["closed"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=16, help="concurrent (16)")
    parser.add_argument("--max-instance-mb", type=int, default=256, help="node limit (256)")
    parser.add_argument("--workdir", type=Path, help="the node's data folder (default: temp)")
    args = parser.parse_args()
    limit = args.max_instance_mb * MiB
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dafne-memory-"))
    port = free_port()
    environment = dict(os.environ, DAFNE_DICOM__BIND="127.0.0.1",
                       DAFNE_DICOM__MAX_ASSOCIATIONS=str(args.associations),
                       DAFNE_DICOM__MAX_INSTANCE_MB=str(args.max_instance_mb))
    node_cli = str(Path(sys.executable).with_name("dafne-node"))
    log = (work / "node.log").open("wb")
    node = subprocess.Popen([node_cli, "serve", "--data-dir", str(work / "node"),
                             "--port", str(port), "--http-port", str(free_port())],
                            env=environment, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with RawPeer(port, timeout=2) as peer:
                    if peer.associate([(MR, [EXPLICIT])]).type == A_ASSOCIATE_AC_TYPE:
                        break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)
        baseline = status_kib(node.pid, "VmRSS") / 1024
        pixels = limit - 4096
        scenarios: dict[str, Callable[[], dict[str, object]]] = {
            "largest": lambda: run_scenario(node.pid, port, args.associations, lambda uid: (
                header(uid, pixels), pixels, EXPLICIT)),
            "oversize": lambda: run_scenario(node.pid, port, args.associations, lambda uid: (
                header(uid, 2 * limit), 2 * limit, EXPLICIT)),
            "bombs": lambda: run_scenario(node.pid, port, args.associations, lambda uid: (
                deflate_bomb(uid, 1024 * MiB), 0, DEFLATED)),
            "idle": lambda: idle_scenario(node.pid, port),
        }
        results = {}
        for name, scenario in tqdm(scenarios.items(), desc="scenarios", unit="scenario"):
            results[name] = scenario()
    finally:
        node.terminate()
        node.wait(30)
        log.close()
    print(f"\nnode idle (model loaded): {baseline:.0f} MiB resident; limit "
          f"{args.max_instance_mb} MiB, {args.associations} associations")
    print(f"{'scenario':<10} {'in flight MiB':>14} {'peak MiB':>10} {'peak-idle':>10}  answers")
    for name, result in results.items():
        print(f"{name:<10} {result['in_flight_mib']:>14.0f} {result['peak_mib']:>10.0f} "
              f"{result['peak_mib'] - baseline:>10.0f}  {', '.join(result['answers'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
