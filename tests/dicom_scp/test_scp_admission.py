"""Admission: idle, slow and hostile connections never lock real callers out.

A vulnerability scanner opens TCP connections to every port and sends nothing; before
admission, sixteen of them held every association slot for the ACSE timeout. These tests
hold a hundred idle connections open (from one address and from twenty) while a real
caller associates, and check that the idle ones are closed within the configured time.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from deploy.rawpeer import (
    A_ABORT_TYPE,
    A_ASSOCIATE_AC_TYPE,
    CLOSED,
    RawPeer,
    association_request,
)
from dicom_scp.admission import AdmissionLimits
from dicom_scp.policy import AllowedCaller, CallerPolicy
from tests.dicom_scp.helpers import ServerFactory

REQUEST_TIMEOUT_S = 1.0


def _idle(port: int, count: int, sources: list[str]) -> list[socket.socket]:
    sockets = []
    for number in range(count):
        sock = socket.socket()
        sock.bind((sources[number % len(sources)], 0))
        sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def _closed_by_node(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _echo_within(port: int, seconds: float) -> float:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    ae.acse_timeout = seconds
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="DAFNE")
    try:
        assert assoc.is_established, "a real caller was locked out"
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    return time.monotonic() - started


@pytest.mark.parametrize("sources", [["127.0.0.1"], [f"127.0.0.{n}" for n in range(2, 22)]],
                         ids=["one-address", "twenty-addresses"])
def test_hundred_idle_connections_do_not_lock_out_a_caller(
    scp: ServerFactory, mr_files: list[Path], sources: list[str]
) -> None:
    server = scp(admission=AdmissionLimits(request_timeout_s=REQUEST_TIMEOUT_S),
                 max_associations=4, policy=CallerPolicy([AllowedCaller("PACS")]))
    idle = _idle(server.port, 100, sources)
    try:
        time.sleep(0.2)  # let them all reach admission
        assert server.waiting_connections() <= 100
        assert _echo_within(server.port, 5) < 1.0
        # a C-STORE too, while they are still held
        ae = AE(ae_title="PACS")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="DAFNE")
        assert assoc.is_established
        assert assoc.send_c_store(dcmread(mr_files[0])).Status == 0x0000
        assoc.release()
        # none of them ever held an association slot
        assert server.active_associations() <= 1
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 1.0
        assert all(_closed_by_node(sock, max(0.01, deadline - time.monotonic()))
                   for sock in idle)
        assert server.waiting_connections() == 0
    finally:
        for sock in idle:
            sock.close()


def test_per_address_cap_closes_the_oldest(scp: ServerFactory) -> None:
    server = scp(admission=AdmissionLimits(request_timeout_s=30, max_pending_per_address=3))
    idle = _idle(server.port, 5, ["127.0.0.1"])
    try:
        # the first two were closed to make room for the last three, long before 30 s
        assert _closed_by_node(idle[0], 2.0)
        assert _closed_by_node(idle[1], 2.0)
        assert not _closed_by_node(idle[4], 0.3)
        assert server.waiting_connections() == 3
        assert _echo_within(server.port, 5) < 1.0
    finally:
        for sock in idle:
            sock.close()


def test_slow_association_request_holds_no_slot(scp: ServerFactory) -> None:
    """A peer that sends part of its request and stalls (slowloris) is closed in time."""
    server = scp(admission=AdmissionLimits(request_timeout_s=REQUEST_TIMEOUT_S),
                 max_associations=2)
    request = association_request([(Verification, ["1.2.840.10008.1.2"])])
    stalled = []
    for _ in range(8):
        peer = RawPeer(server.port)
        peer.send(request[:20])
        stalled.append(peer)
    try:
        assert _echo_within(server.port, 5) < 1.0
        for peer in stalled:
            assert peer.read_pdu(REQUEST_TIMEOUT_S + 1.5).type == CLOSED
    finally:
        for peer in stalled:
            peer.close()


def test_allow_list_with_addresses_closes_others_at_accept(scp: ServerFactory) -> None:
    server = scp(policy=CallerPolicy([AllowedCaller("PACS", "127.0.0.1")]))
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.9", 0))
        stranger.connect(("127.0.0.1", server.port))
        assert _closed_by_node(stranger, 1.0)
    assert _echo_within(server.port, 5) < 1.0


def test_allow_list_of_titles_only_admits_every_address(scp: ServerFactory) -> None:
    server = scp(policy=CallerPolicy([AllowedCaller("PACS")]))
    with RawPeer(server.port, source="127.0.0.9") as peer:
        answer = peer.associate([(Verification, ["1.2.840.10008.1.2"])], calling="PACS")
        assert answer.type == A_ASSOCIATE_AC_TYPE


@pytest.mark.parametrize("first", [
    bytes((0x04, 0, 0, 0, 0, 4, 0, 0, 0, 0)),  # P-DATA-TF before any association
    bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0)),  # A-RELEASE-RQ
    bytes((0x09, 0, 0, 0, 0, 4, 0, 0, 0, 0)),  # no such PDU type
    bytes((0x01, 0, 0x7F, 0xFF, 0xFF, 0xFF)),  # an association request of 2 GiB
], ids=["p-data", "release", "unknown-type", "huge-request"])
def test_anything_but_an_association_request_is_aborted(
    scp: ServerFactory, first: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    server = scp()
    with RawPeer(server.port) as peer:
        peer.send(first)
        assert peer.read_pdu(2.0).type == A_ABORT_TYPE
        assert peer.read_pdu(2.0).type == CLOSED
    assert server.active_associations() == 0
    assert not [record for record in caplog.records if record.exc_info]
    assert any("Closed connection from" in record.getMessage() for record in caplog.records)


@pytest.fixture
def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate made here, and a client trusting it."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=dafne-test",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        capture_output=True, timeout=60, check=False)
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate: {made.stderr[-200:]!r}")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


def test_tls_handshake_happens_in_admission_and_a_stalled_one_holds_up_nobody(
    scp: ServerFactory, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, client_context = tls_contexts
    server = scp(ssl_context=server_context,
                 admission=AdmissionLimits(request_timeout_s=REQUEST_TIMEOUT_S))
    stalled = _idle(server.port, 20, ["127.0.0.1"])  # TCP up, no ClientHello ever
    half = socket.create_connection(("127.0.0.1", server.port))
    half.sendall(b"\x16\x03\x01\x00\xff\x01")  # the first bytes of a ClientHello, then nothing
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", server.port, ae_title="DAFNE",
                             tls_args=(client_context, "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert time.monotonic() - started < 1.0
        assert _closed_by_node(half, REQUEST_TIMEOUT_S + 1.0)
    finally:
        for sock in [*stalled, half]:
            sock.close()


def test_tls_handshake_failure_closes_with_one_line(
    scp: ServerFactory, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = scp(ssl_context=tls_contexts[0])
    with RawPeer(server.port) as peer:  # plain DICOM to a TLS port
        peer.send(association_request([(Verification, ["1.2.840.10008.1.2"])]))
        assert peer.read_pdu(2.0).type == CLOSED
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info]


def test_association_that_cannot_start_is_aborted_not_left_waiting(
    scp: ServerFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = scp()

    def no_thread(*args: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(server._server, "start_association", no_thread)
    monkeypatch.setattr(server._server.admission, "_hand_over", no_thread)
    with RawPeer(server.port) as peer:
        peer.send(association_request([(Verification, ["1.2.840.10008.1.2"])]))
        assert peer.read_pdu(2.0).type == A_ABORT_TYPE
    assert "cannot start its association" in caplog.text
    assert not [r for r in caplog.records if r.exc_info]
