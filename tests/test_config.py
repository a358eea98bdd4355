"""The node's configuration: defaults, TOML, environment, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dafne_node.config import ConfigError, load_config


def test_no_configuration_gives_a_working_node(tmp_path: Path) -> None:
    config = load_config(environ={})
    assert config.dicom.ae_title == "DAFNE"
    assert config.dicom.port == 11112
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8765)
    assert config.assembly.quiet_period_s == 10
    assert config.database_url.startswith("sqlite:///")
    assert config.model.dir is None
    assert config.dicom.association_request_timeout_s == 5
    assert config.dicom.max_instance_mb == 256


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        'default_destination = "pacs"\n[dicom]\nae_title = "LEGNODE"\nport = 1104\n'
        '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "10.0.0.5"\nport = 4242\n'
    )
    environ = {"DAFNE_DICOM__PORT": "2104", "DAFNE_DB_URL": "postgresql+psycopg://db/dafne"}
    config = load_config(path, environ=environ, overrides={("http", "port"): 9000})
    assert config.dicom.ae_title == "LEGNODE"
    assert config.dicom.port == 2104
    assert config.http.port == 9000
    assert config.database_url == "postgresql+psycopg://db/dafne"
    assert config.destination("pacs").port == 4242


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dicom]\nport = 70000\n", "dicom.port: Input should be less than or equal to 65535"),
        ("[dicom]\nae_title = \"A_TITLE_LONGER_THAN_16\"\n", "dicom.ae_title"),
        ("[dicom]\nprot = 104\n", "dicom.prot: Extra inputs are not permitted"),
        ("[[routes]]\nname = \"r\"\nseries_description = \"(\"\n",
         "routes.0.series_description"),
        ("[[routes]]\nname = \"r\"\ndestinations = [\"nowhere\"]\n",
         "routes.r.destinations: no destination named 'nowhere'"),
        ("[dicom\n", "not valid TOML"),
        ("[dicom]\nassociation_request_timeout_s = 0\n",
         "dicom.association_request_timeout_s: Input should be greater than 0"),
        ("[dicom]\nmax_instance_mb = 0\n", "dicom.max_instance_mb"),
        ("[training]\ncontrast_fold = 1.5\n",
         "training.contrast_fold: Input should be less than or equal to 1"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, environ={})


def test_bad_environment_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=re.escape("dicom.port")):
        load_config(environ={"DAFNE_PORT": "not-a-port"})


def test_the_shipped_example_configuration_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "deploy" / "node.example.toml"
    config = load_config(example, environ={})
    assert config.routes[0].destinations == ["pacs"]
    assert config.destination("pacs").ae_title == "ORTHANC"


# -- [federation] ---------------------------------------------------------------------------

PUBLIC_KEY = "ed25519:" + "A" * 43 + "="  # 32 zero bytes, base64


def _federation(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> object:
    path = tmp_path / "node.toml"
    path.write_text(f"[federation]\n{text}")
    return load_config(path, environ=environ or {}).federation


def test_federation_is_off_by_default() -> None:
    federation = load_config(environ={}).federation
    assert federation.url is None and not federation.enabled
    assert (federation.model, federation.poll_interval_s, federation.timeout_s) == ("leg", 300, 30)
    assert (federation.upload_encoding, federation.upload_density) == ("topk-int8", 0.2)
    assert (federation.retry_initial_s, federation.retry_max_s) == (5, 900)
    assert federation.verify_tls is True and federation.ca_file is None


def test_federation_from_the_file_and_the_environment(tmp_path: Path) -> None:
    federation = _federation(
        tmp_path,
        f'url = "https://fed.example.org/"\ntoken = "dfn_file"\npublic_key = "{PUBLIC_KEY}"\n'
        'model = "leg-t2"\nupload_encoding = "int8"\npoll_interval_s = 0.5\n',
        environ={"DAFNE_FEDERATION__TOKEN": "dfn_env", "DAFNE_FEDERATION__TIMEOUT_S": "5"},
    )
    assert federation.enabled
    assert federation.url == "https://fed.example.org"  # paths are appended to it
    assert federation.bearer_token() == "dfn_env"
    assert "dfn_env" not in repr(federation), "the token is never printed"
    assert (federation.model, federation.upload_encoding, federation.poll_interval_s,
            federation.timeout_s) == ("leg-t2", "int8", 0.5, 5)


def test_federation_only_from_the_environment(tmp_path: Path) -> None:
    federation = load_config(environ={
        "DAFNE_FEDERATION__URL": "http://127.0.0.1:8000", "DAFNE_FEDERATION__TOKEN": "dfn_x",
        "DAFNE_FEDERATION__PUBLIC_KEY": PUBLIC_KEY}).federation
    assert (federation.url, federation.bearer_token()) == ("http://127.0.0.1:8000", "dfn_x")


def test_the_token_file_is_read_at_each_use(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("dfn_first\n")
    federation = _federation(tmp_path, f'url = "https://fed.example.org"\n'
                             f'token_file = "{token_file}"\npublic_key = "{PUBLIC_KEY}"\n')
    assert federation.bearer_token() == "dfn_first"
    token_file.write_text("dfn_rotated")
    assert federation.bearer_token() == "dfn_rotated"
    token_file.write_text("  \n")
    with pytest.raises(ConfigError, match=re.escape(f"federation.token_file: {token_file} is "
                                                    "empty")):
        federation.bearer_token()
    token_file.unlink()
    with pytest.raises(ConfigError, match=re.escape(f"federation.token_file: {token_file}: no "
                                                    "such file")):
        federation.bearer_token()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('url = "https://f.example.org"\npublic_key = "KEY"\n',
         "federation.token: required when federation.url is set"),
        ('url = "https://f.example.org"\ntoken = "dfn_a"\n',
         "federation.public_key: required when federation.url is set"),
        ('url = "https://f.example.org"\ntoken = "dfn_a"\npublic_key = "ed25519:AAAA"\n',
         "federation.public_key: public key after 'ed25519:' decodes to 3 bytes"),
        ('url = "https://f.example.org"\ntoken = "dfn_a"\npublic_key = "/no/such.pem"\n',
         "federation.public_key: public key '/no/such.pem' is neither"),
        ('url = "https://f.example.org"\ntoken = "dfn_a"\ntoken_file = "t"\n'
         'public_key = "KEY"\n', "federation.token_file: give federation.token or"),
        ('url = "https://f.example.org"\ntoken_file = "/no/such/token"\npublic_key = "KEY"\n',
         "federation.token_file: /no/such/token: no such file"),
        ('url = "https://f.example.org"\ntoken = "dfn_a"\npublic_key = "KEY"\n'
         'ca_file = "/no/ca.pem"\n', "federation.ca_file: /no/ca.pem: no such file"),
        ('url = "ftp://f.example.org"\n', "federation.url: Value error, must be an http://"),
        ('model = "Leg Model"\n', "federation.model: String should match pattern"),
        ("upload_density = 0\n", "federation.upload_density: Input should be greater than 0"),
        ("upload_density = 1.5\n", "federation.upload_density: Input should be less than"),
        ('upload_encoding = "zip"\n', "federation.upload_encoding: Input should be 'fp16'"),
        ("poll_interval_s = 0.1\n", "federation.poll_interval_s: Input should be greater"),
        ("retry_max_s = 0\n", "federation.retry_max_s"),
        ("secret = 1\n", "federation.secret: Extra inputs are not permitted"),
    ],
)
def test_bad_federation_configuration_names_the_key(tmp_path: Path, text: str,
                                                    message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _federation(tmp_path, text.replace("KEY", PUBLIC_KEY))


def test_a_federation_key_may_be_a_pem_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    pem = tmp_path / "federation.pem"
    pem.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    federation = _federation(tmp_path, f'url = "https://f.example.org"\ntoken = "dfn_a"\n'
                             f'public_key = "{pem}"\n')
    assert federation.public_key == str(pem)
