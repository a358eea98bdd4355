"""The fast receive path's contract with pynetdicom: what it mirrors is what is installed.

If this fails after a pynetdicom upgrade, the message names each private method whose
source changed (or attribute that is gone) and the module of ours that mirrors it: review
that module against the new pynetdicom, then pin the new fingerprints
(``python -m dicom_scp.reactor.contract``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from dicom_scp.reactor import contract
from tests.dicom_scp.helpers import ServerFactory


@pytest.fixture
def fresh() -> Iterator[None]:
    contract.differences.cache_clear()
    yield
    contract.differences.cache_clear()


def test_installed_pynetdicom_is_what_the_fast_path_mirrors(fresh: None) -> None:
    found = contract.differences()
    assert not found, "pynetdicom differs from the fast path's contract:\n" + "\n".join(found)
    assert contract.is_supported()


def test_a_changed_private_method_is_named(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def _read_pdu_data(self: DULServiceProvider) -> None:
        """A pynetdicom release that reads PDUs differently."""

    monkeypatch.setattr(DULServiceProvider, "_read_pdu_data", _read_pdu_data)
    found = contract.differences()
    assert any(
        "DULServiceProvider._read_pdu_data changed" in line and "dicom_scp/reactor/dul.py" in line
        for line in found
    ), found
    assert not contract.is_supported()


def test_a_missing_method_or_attribute_is_named(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(DULServiceProvider, "_is_transport_event")
    monkeypatch.setitem(
        contract.ATTRIBUTES, "pynetdicom.association.Association", ("_no_such_attribute",)
    )
    found = contract.differences()
    assert any("_is_transport_event is gone" in line for line in found), found
    assert any("'_no_such_attribute'" in line for line in found), found


def test_server_falls_back_to_stock_loops_when_the_contract_fails(
    fresh: None, scp: ServerFactory, mr_files: list[Path], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("dicom_scp.reactor.server.differences", lambda: ("pynetdicom.x changed",))
    monkeypatch.setattr("dicom_scp.reactor.server.is_supported", lambda: False)
    server = scp()
    assert "pynetdicom.x changed" in caplog.text
    ae = AE(ae_title="PACS")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="DAFNE")
    assert assoc.is_established
    assert [type(a) for a in server._ae.active_associations] == [Association]
    assert assoc.send_c_store(dcmread(mr_files[0])).Status == 0x0000
    assoc.release()
