"""A seeded fuzz campaign against a running node: it answers everything and loses nothing.

About a thousand mutated data sets, three hundred mutated PDUs and three hundred mutated
command sets go to ``dafne-node serve`` (JSON logs) over loopback, from a raw socket that
sends what no real implementation would. After each case the campaign sends a C-ECHO,
so every case ends with a complete request that must be answered (a response or an
A-ABORT, never silence). Then:

* the log holds no traceback and nothing but JSON lines;
* every C-STORE answered with success is indexed, and its file holds the data set byte
  for byte as it was sent;
* a valid study pushed with dcmtk's storescu still comes back as a SEG.

The mutations are seeded (``FUZZ_SEED``), so a failure replays exactly.
"""

from __future__ import annotations

import json
import random
import sqlite3
import struct
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.netns import driver_result, run_in_netns

FUZZ_SEED = 20261201
DATASETS = 1000
PDUS = 300
COMMANDS = 300
NODE_PORT = 11112
PACS_PORT = 4242
DRIVER_TIMEOUT = 300.0


# --------------------------------------------------------------------------------------------
# pytest side


def test_fuzz_campaign_leaves_the_node_answering_and_whole(tmp_path: Path) -> None:
    from dafne_node.phantom import make_study  # noqa: PLC0415 - keep the driver light
    from dafne_node.phantom.study import write_study  # noqa: PLC0415

    study = write_study(make_study(site="A", seed=5, slices=8, matrix=64), tmp_path / "study")
    completed = run_in_netns(__file__, [tmp_path / "work", study.images[0].parent],
                             timeout=DRIVER_TIMEOUT)
    result = driver_result(completed)
    assert result["unanswered"] == [], result["unanswered"][:10]
    assert result["cases"] >= DATASETS + PDUS + COMMANDS
    assert result["campaign_s"] < 90, result["campaign_s"]
    assert result["stored"] > 50, "too few mutated data sets were stored to check anything"
    assert result["refused"] > 50
    assert result["not_indexed"] == [], result["not_indexed"][:10]
    assert result["not_byte_for_byte"] == [], result["not_byte_for_byte"][:10]
    assert result["non_json_lines"] == [], result["non_json_lines"][:10]
    assert result["tracebacks"] == [], result["tracebacks"][:3]
    assert result["seg_received"], result["log_tail"]
    assert result["node_alive"]


# --------------------------------------------------------------------------------------------
# driver side (inside the namespace)

Mutation = Callable[[random.Random, bytes], bytes]

ECHO_RQ = {0x0002: b"1.2.840.10008.1.1\x00", 0x0100: b"\x30\x00", 0x0110: b"\x07\x00",
           0x0800: b"\x01\x01"}
"""A C-ECHO-RQ command set's elements (Message ID 7)."""


def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(len(out))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def _insert(rng: random.Random, data: bytes) -> bytes:
    position = rng.randrange(len(data) + 1)
    return data[:position] + rng.randbytes(rng.randint(1, 64)) + data[position:]


def _delete(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 256):]


def _length(rng: random.Random, data: bytes) -> bytes:
    """Overwrite what may be an element's length with an extreme value."""
    position = rng.randrange(0, max(1, len(data) - 8), 2)
    value = rng.choice([b"\xff\xff\xff\xff", b"\xff\xff", b"\x00\x00", b"\xfe\xff\x00\xe0",
                        struct.pack("<I", rng.getrandbits(32))])
    return data[:position] + value + data[position + len(value):]


def _duplicate(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    chunk = data[start : start + rng.randint(1, 512)]
    return data[:start] + chunk * rng.randint(2, 4) + data[start:]


MUTATIONS: tuple[Mutation, ...] = (_flip, _truncate, _insert, _delete, _length, _duplicate)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        if data:
            data = rng.choice(MUTATIONS)(rng, data)
    return data


class Campaign:
    """Sends the cases and keeps what each was answered."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.cases = 0
        self.unanswered: list[str] = []
        self.acknowledged: dict[str, bytes] = {}
        self.refused = 0

    def peer(self) -> Any:
        from pydicom.uid import (  # noqa: PLC0415
            CTImageStorage,
            DeflatedExplicitVRLittleEndian,
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
        )

        from deploy.rawpeer import A_ASSOCIATE_AC_TYPE, RawPeer  # noqa: PLC0415

        peer = RawPeer(NODE_PORT, timeout=5.0)
        answer = peer.associate([
            ("1.2.840.10008.1.1", [ImplicitVRLittleEndian]),
            (CTImageStorage, [ExplicitVRLittleEndian]),
            (CTImageStorage, [ImplicitVRLittleEndian]),
            (CTImageStorage, [DeflatedExplicitVRLittleEndian]),
        ], calling="FUZZ", called="DAFNE")
        if answer.type != A_ASSOCIATE_AC_TYPE:
            raise RuntimeError(f"the node refused the fuzzer's association: {answer}")
        return peer

    def echo_answered(self, peer: Any, case: str) -> bool:
        """Send a C-ECHO; record the case as unanswered if nothing at all comes back."""
        from deploy.rawpeer import (  # noqa: PLC0415
            A_ABORT_TYPE,
            CLOSED,
            P_DATA_TF_TYPE,
            SILENCE,
            command_set,
            pdata,
            response_status,
        )

        peer.send(pdata(1, 0x03, command_set(ECHO_RQ)))
        while True:
            answer = peer.read_pdu(3.0)
            if answer.type == SILENCE:
                self.unanswered.append(case)
                return False
            if answer.type in (CLOSED, A_ABORT_TYPE):
                return False
            if answer.type == P_DATA_TF_TYPE:
                status = response_status(answer)
                command = answer.body[6:]
                if status is not None and b"\x30\x80" in command[:64]:  # C-ECHO-RSP
                    return True

    def datasets(self, bases: list[Any]) -> None:
        from pydicom.filebase import DicomBytesIO  # noqa: PLC0415
        from pydicom.filewriter import write_dataset  # noqa: PLC0415
        from pydicom.uid import generate_uid  # noqa: PLC0415

        from deploy.rawpeer import (  # noqa: PLC0415
            P_DATA_TF_TYPE,
            SILENCE,
            c_store,
            response_status,
        )

        peer = self.peer()
        for number in range(DATASETS):
            base = bases[number % len(bases)]
            base.SOPInstanceUID = generate_uid()
            syntax = self.rng.choices(["explicit", "implicit", "deflated"], [6, 3, 1])[0]
            buffer = DicomBytesIO()
            buffer.is_little_endian = True
            buffer.is_implicit_VR = syntax == "implicit"
            write_dataset(buffer, base)
            data = _mutate(self.rng, buffer.getvalue())
            if syntax == "deflated":  # mutated before or after deflating
                deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
                data = deflater.compress(data) + deflater.flush()
                if self.rng.random() < 0.5:
                    data = _mutate(self.rng, data)
            context = {"explicit": 3, "implicit": 5, "deflated": 7}[syntax]
            self.cases += 1
            answer = c_store(peer, context, base.SOPClassUID, base.SOPInstanceUID, data,
                             message_id=number % 65536, fragment=self.rng.choice([512, 16000]))
            status = response_status(answer) if answer.type == P_DATA_TF_TYPE else None
            if answer.type == SILENCE:
                self.unanswered.append(f"data set {number}")
            if status is not None and status[0] == 0x0000:
                self.acknowledged[str(base.SOPInstanceUID)] = data
            elif status is not None:
                self.refused += 1
            if status is None:  # aborted: start again
                peer.close()
                peer = self.peer()
        peer.close()

    def pdus(self) -> None:
        from deploy.rawpeer import (  # noqa: PLC0415
            A_RELEASE_RP_TYPE,
            association_request,
            command_set,
            pdata,
        )

        rng = self.rng
        echo_rq = association_request([("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])])
        for number in range(PDUS):
            self.cases += 1
            family = number % 6
            if family == 0:  # a mutated association request, before any association
                from deploy.rawpeer import RawPeer  # noqa: PLC0415

                body = _mutate(rng, echo_rq[6:])
                with RawPeer(NODE_PORT, timeout=5.0) as peer:
                    peer.send(struct.pack(">BBL", 1, 0, len(body)) + body)
                    if peer.read_pdu(3.0).type == -1:
                        self.unanswered.append(f"pdu {number}: mutated A-ASSOCIATE-RQ")
                continue
            peer = self.peer()
            try:
                if family == 1:  # any PDU type, random body
                    body = rng.randbytes(rng.randint(0, 64))
                    pdu = struct.pack(">BBL", rng.randrange(256), 0, len(body)) + body
                elif family == 2:  # P-DATA-TF with mutated items (PDU length kept right)
                    items = pdata(rng.choice([1, 2, 3, 4, 255]), rng.randrange(256),
                                  rng.randbytes(rng.randint(0, 40)))[6:]
                    items = _mutate(rng, items)
                    pdu = struct.pack(">BBL", 4, 0, len(items)) + items
                elif family == 3:  # a second association request inside the association
                    pdu = echo_rq
                elif family == 4:  # release, then anything (events in Sta13)
                    peer.send(bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
                    if peer.read_pdu(3.0).type != A_RELEASE_RP_TYPE:
                        self.unanswered.append(f"pdu {number}: A-RELEASE-RQ")
                    body = rng.randbytes(rng.randint(0, 32))
                    peer.send(struct.pack(">BBL", rng.randint(1, 7), 0, len(body)) + body)
                    continue  # the association is over: nothing more is a request
                else:  # a mutated C-ECHO command
                    pdu = _mutate(rng, pdata(1, 0x03, command_set(ECHO_RQ))[6:])
                    pdu = struct.pack(">BBL", 4, 0, len(pdu)) + pdu
                peer.send(pdu)
                self.echo_answered(peer, f"pdu {number}: family {family}")
            finally:
                peer.close()

    def commands(self, base: Any) -> None:
        from pydicom.filebase import DicomBytesIO  # noqa: PLC0415
        from pydicom.filewriter import write_dataset  # noqa: PLC0415

        from deploy.rawpeer import (  # noqa: PLC0415
            command_set,
            pdata,
            store_request_elements,
        )

        rng = self.rng
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, base)
        dataset = buffer.getvalue()
        fields = [0x0002, 0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1000, 0x1030,
                  0x1031, 0x0600, 0x0902]
        peer = self.peer()
        for number in range(COMMANDS):
            self.cases += 1
            elements = store_request_elements(str(base.SOPClassUID), str(base.SOPInstanceUID),
                                              number)
            for _ in range(rng.randint(1, 3)):
                action = rng.randrange(4)
                key = rng.choice(fields)
                if action == 0:
                    elements.pop(key, None)
                elif action == 1:
                    elements[key] = rng.randbytes(rng.choice([0, 1, 2, 3, 4, 9, 64]))
                elif action == 2:
                    elements[0x0100] = struct.pack("<H", rng.choice(
                        [0x0001, 0x0020, 0x0021, 0x0010, 0x0030, 0x0130, 0x0FFF, 0x8001,
                         0x0100, 0x0110, rng.getrandbits(16)]))
                else:
                    elements[rng.getrandbits(16)] = rng.randbytes(rng.randint(0, 8))
            command = command_set(elements)
            if rng.random() < 0.2:
                command = _mutate(rng, command)
            peer.send(pdata(3, 0x03, command))
            if rng.random() < 0.8:
                peer.send(pdata(3, 0x02, dataset))
            if not self.echo_answered(peer, f"command {number}"):
                peer.close()
                peer = self.peer()
        peer.close()


def _bases(images: Path) -> list[Any]:
    """CT copies of the phantom's images in a study of their own (no route segments CT)."""
    from pydicom import dcmread  # noqa: PLC0415
    from pydicom.uid import CTImageStorage, generate_uid  # noqa: PLC0415

    study, series = generate_uid(), generate_uid()
    bases = []
    for path in sorted(images.glob("*.dcm"))[:4]:
        ds = dcmread(path)
        del ds.file_meta
        ds.SOPClassUID = CTImageStorage
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        bases.append(ds)
    return bases


def _check_store(work: Path, acknowledged: dict[str, bytes]) -> tuple[list[str], list[str]]:
    connection = sqlite3.connect(work / "node" / "dafne.db", timeout=10)
    try:
        rows = dict(connection.execute("select sop_instance_uid, spool_path from instances"))
    finally:
        connection.close()
    not_indexed, different = [], []
    for uid, sent in acknowledged.items():
        if uid not in rows:
            not_indexed.append(uid)
            continue
        raw = (work / "node" / "spool" / rows[uid]).read_bytes()
        if raw[144 + int.from_bytes(raw[140:144], "little"):] != sent:
            different.append(uid)
    return not_indexed, different


def _read_log(log: Path) -> tuple[list[str], list[str]]:
    non_json, tracebacks = [], []
    for line in log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        if line.startswith("Dafne node "):  # serve's banner on stdout, not a log line
            continue
        try:
            record = json.loads(line)
        except ValueError:
            non_json.append(line)
            continue
        if "exception" in record or "Traceback" in str(record.get("message", "")):
            tracebacks.append(line)
    return non_json, tracebacks


def _drive(work: Path, images: Path) -> dict[str, Any]:
    from pydicom import dcmread  # noqa: PLC0415

    from deploy.netns import spawn, start_storescp, storescu, wait_for  # noqa: PLC0415
    from tests.integration.test_node_e2e import DAFNE_NODE  # noqa: PLC0415

    work.mkdir(parents=True, exist_ok=True)
    pacs = start_storescp(work / "pacs", PACS_PORT, aet="PACS")
    node = spawn("dafne-node", [
        DAFNE_NODE, "--log-level", "info", "--log-format", "json", "serve",
        "--data-dir", str(work / "node"), "--dest", f"PACS@127.0.0.1:{PACS_PORT}",
        "--quiet-period", "2",
    ], work / "node.log", env={"RUST_BACKTRACE": "0"})
    try:
        from deploy.netns import echoscu  # noqa: PLC0415

        wait_for(lambda: echoscu(NODE_PORT, aec="DAFNE", timeout=2), 90, interval=0.5,
                 what="the node answering C-ECHO")
        campaign = Campaign(random.Random(FUZZ_SEED))
        started = time.monotonic()
        bases = _bases(images)
        campaign.datasets(bases)
        campaign.pdus()
        campaign.commands(bases[0])
        campaign_s = time.monotonic() - started
        storescu([images], port=NODE_PORT, aec="DAFNE")
        try:
            received = wait_for(lambda: list((work / "pacs").iterdir()), 120, interval=0.5,
                                what="the valid study's SEG")
            seg_received = dcmread(received[0]).Modality == "SEG"
        except TimeoutError:
            seg_received = False
        node_alive = node.running
        not_indexed, different = _check_store(work, campaign.acknowledged)
    finally:
        node.stop()
        pacs.stop()
    non_json, tracebacks = _read_log(work / "node.log")
    return {
        "cases": campaign.cases, "campaign_s": round(campaign_s, 1),
        "unanswered": campaign.unanswered, "stored": len(campaign.acknowledged),
        "refused": campaign.refused, "not_indexed": not_indexed,
        "not_byte_for_byte": different, "non_json_lines": non_json,
        "tracebacks": tracebacks, "seg_received": seg_received, "node_alive": node_alive,
        "log_tail": node.log_tail(3000),
    }


if __name__ == "__main__":
    from deploy.netns import emit_result

    emit_result(_drive(Path(sys.argv[1]), Path(sys.argv[2])))
