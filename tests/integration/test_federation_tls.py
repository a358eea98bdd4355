"""The federation API over HTTPS: clients trust it through the CA they are given, only."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.federation.server import set_up, start_api
from tests.federation.tls import make_certificates


def test_https_is_verified_against_the_configured_ca(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path / "tls")
    stranger = make_certificates(tmp_path / "other", ca_name="Someone else's CA")
    setup = set_up(tmp_path, sections={"server": {"tls_cert": certificates.server_cert,
                                                  "tls_key": certificates.server_key}})
    token = setup.tokens["hospital-a"]
    with start_api(setup, scheme="https", verify=str(certificates.ca_cert)) as url:
        assert url.startswith("https://")
        answer = httpx.get(f"{url}/v1/models", verify=str(certificates.ca_cert),
                           headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json()[0]["name"] == "leg"
        for verify in (True, str(stranger.ca_cert)):  # system CAs, or another CA
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                httpx.get(f"{url}/v1/health", verify=verify)
        plain = url.replace("https://", "http://")
        with pytest.raises(httpx.TransportError):  # no plain HTTP beside HTTPS
            httpx.get(f"{plain}/v1/health", timeout=5)
