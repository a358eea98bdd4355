"""The federation server's configuration: example file, overrides, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.config import ConfigError, load_federation_config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "federation.example.toml"


def test_defaults_run_out_of_the_box() -> None:
    config = load_federation_config(environ={})
    assert config.database_url.endswith("federation-data/federation.db")
    assert config.aggregation.strategy == "fedbuff"
    assert config.gate_rule_for("fedbuff") == "relative"
    assert config.gate_rule_for("dafne") == "absolute"


def test_the_example_file_is_valid() -> None:
    config = load_federation_config(EXAMPLE, environ={})
    assert config.server.port == 8443 and config.server.tls_cert is not None
    assert config.database_url.startswith("postgresql+psycopg://")


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text("[aggregation]\nbuffer_size = 5\n")
    config = load_federation_config(path, environ={
        "DAFNE_FED_AGGREGATION__BUFFER_SIZE": "7",
        "DAFNE_FED_DB_URL": "postgresql+psycopg://fed@db/fed"})
    assert config.aggregation.buffer_size == 7
    assert config.database_url == "postgresql+psycopg://fed@db/fed"


@pytest.mark.parametrize(("text", "key"), [
    ("[aggregation]\nbuffer_size = 0\n", "aggregation.buffer_size"),
    ("[aggregation]\nstrategy = 'median'\n", "aggregation.strategy"),
    ("[aggregation]\nclip_norm = 500.0\nmax_norm = 100.0\n", "aggregation"),
    ("[server]\ntls_cert = 'a.pem'\n", "server"),
    ("[gate]\nmax_mean_drop = -1\n", "gate.max_mean_drop"),
    ("[gate]\nstep_fractions = [0.5, 1.5]\n", "gate.step_fractions.1"),
    ("[gate]\nlift_weakest_site = [2, 1]\n", "gate.lift_weakest_site.1"),
    ("[server]\nprot = 1\n", "server.prot"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "federation.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}: {key}"):
        load_federation_config(path, environ={})
