"""The federation API over HTTPS: clients trust it through the CA they are given, only."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from dafne_node.config import NodeConfig, load_config
from dafne_node.inference.model import ActiveModel
from dafne_node.learning.sync import SyncClient
from db.migrate import upgrade
from db.session import make_engine, make_session_factory
from tests.federation.server import set_up, start_api
from tests.federation.tls import make_certificates


def _trust(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def test_https_is_verified_against_the_configured_ca(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path / "tls")
    stranger = make_certificates(tmp_path / "other", ca_name="Someone else's CA")
    setup = set_up(tmp_path, sections={"server": {"tls_cert": certificates.server_cert,
                                                  "tls_key": certificates.server_key}})
    token = setup.tokens["hospital-a"]
    with start_api(setup, scheme="https", verify=_trust(certificates.ca_cert)) as url:
        assert url.startswith("https://")
        answer = httpx.get(f"{url}/v1/models", verify=_trust(certificates.ca_cert),
                           headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json()[0]["name"] == "leg"
        for verify in (True, _trust(stranger.ca_cert)):  # system CAs, or another CA
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                httpx.get(f"{url}/v1/health", verify=verify)
        plain = url.replace("https://", "http://")
        with pytest.raises(httpx.TransportError):  # no plain HTTP beside HTTPS
            httpx.get(f"{plain}/v1/health", timeout=5)


def _node_config(folder: Path, url: str, token: str, public_key: str, ca_file: Path
                 ) -> NodeConfig:
    toml = folder / "node.toml"
    toml.write_text(f'[federation]\nurl = "{url}"\ntoken = "{token}"\n'
                    f'public_key = "{public_key}"\nca_file = "{ca_file}"\n')
    return load_config(toml, environ={}, overrides={("node", "data_dir"): folder / "data"})


def test_the_node_pulls_over_https_only_from_a_server_its_ca_vouches_for(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path / "tls")
    stranger = make_certificates(tmp_path / "other", ca_name="Someone else's CA")
    setup = set_up(tmp_path, sections={"server": {"tls_cert": certificates.server_cert,
                                                  "tls_key": certificates.server_key}})
    with start_api(setup, scheme="https", verify=_trust(certificates.ca_cert)) as url:
        for name, ca_file, expected in (("trusted", certificates.ca_cert, "current"),
                                        ("stranger", stranger.ca_cert, "failed")):
            folder = tmp_path / name
            folder.mkdir()
            config = _node_config(folder, url, setup.tokens["hospital-a"], setup.public_key,
                                  ca_file)
            engine = make_engine(config.database_url)
            upgrade(engine)
            sessions = make_session_factory(engine)
            ActiveModel(sessions, config, check_every_s=0)  # registers the bundled g1
            client = SyncClient(config, sessions, owner=name)
            try:
                result = client.poll()
            finally:
                client.close()
                engine.dispose()
            assert result.outcome == expected, (name, result)
            if expected == "failed":
                assert "CERTIFICATE_VERIFY_FAILED" in (result.reason or ""), result
