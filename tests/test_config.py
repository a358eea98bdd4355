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
