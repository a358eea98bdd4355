"""The federation server's configuration: ``federation.toml``, ``DAFNE_FED_*`` overrides.

Same scheme as the node's (:mod:`dafne_node.settings`): every key can be set in the file,
overridden by ``DAFNE_FED_<SECTION>__<KEY>`` (``DAFNE_FED_AGGREGATION__BUFFER_SIZE=5``), the
database URL also by ``DAFNE_FED_DB_URL``; errors name the key. With no file at all the
server runs on SQLite with artifacts, key and validation set in ``federation-data/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from dafne_node.settings import ConfigError, LayeredSettings, Section, load_settings

__all__ = [
    "AggregationSection",
    "ConfigError",
    "FederationConfig",
    "GateSection",
    "ServerSection",
    "load_federation_config",
]

ENV_PREFIX = "DAFNE_FED_"


class ServerSection(Section):
    """``[server]``: where the server keeps its data and how it listens."""

    data_dir: Path = Path("federation-data")
    host: str = "127.0.0.1"
    port: int = Field(default=8800, ge=1, le=65535)
    tls_cert: Path | None = None
    """PEM certificate chain; with ``tls_key`` the server speaks HTTPS only."""
    tls_key: Path | None = None
    max_update_mb: float = Field(default=16.0, gt=0, le=1024)
    """Largest update body accepted (413 above); the default model's update is ~0.5 MB."""
    admin_token_file: Path | None = None
    """The admin token's sha256 (written by ``init``); default ``<data_dir>/admin-token.sha256``."""

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self


class DatabaseSection(Section):
    """``[database]``: SQLite in the data directory unless a URL is given."""

    url: str | None = None


class StorageSection(Section):
    """``[storage]``: where weights and updates are kept (a folder, or ``file://`` URL)."""

    location: str | None = None


class SigningSection(Section):
    """``[signing]``: the Ed25519 key that signs every promoted generation."""

    key_file: Path | None = None


class AggregationSection(Section):
    """``[aggregation]``: how updates become candidate generations (FedBuff by default)."""

    strategy: Literal["fedbuff", "dafne"] = "fedbuff"
    """Strategy of models created by ``model init`` (each model keeps the one it was made with)."""
    buffer_size: int = Field(default=3, ge=1, le=1000)
    """K: a candidate is built as soon as this many updates wait."""
    flush_interval_s: float = Field(default=3600.0, gt=0)
    """…or when the oldest waiting update has waited this long, so a lone hospital counts."""
    max_buffer: int = Field(default=50, ge=1, le=10_000)
    """At most this many updates go into one candidate."""
    server_lr: float = Field(default=1.0, gt=0, le=10)
    clip_norm: float | None = Field(default=20.0, gt=0)
    """Each delta is scaled down to this L2 norm before averaging (None: no clipping)."""
    max_norm: float = Field(default=200.0, gt=0)
    """A delta with a larger L2 norm is refused at upload as an outlier."""
    max_staleness: int = Field(default=20, ge=0)
    """Updates against a generation more than this many generations old are refused (409)."""
    lease_s: float = Field(default=900.0, ge=10)
    """How long an aggregator's lock holds without renewal before another worker may take over."""
    check_every_s: float = Field(default=2.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _norms(self) -> AggregationSection:
        if self.clip_norm is not None and self.clip_norm > self.max_norm:
            raise ValueError("clip_norm must not exceed max_norm")
        return self


class GateSection(Section):
    """``[gate]``: a candidate is promoted only if validation Dice holds."""

    rule: Literal["relative", "absolute"] | None = None
    """``relative`` (default for fedbuff) or ``absolute`` (Dafne's rule, default for dafne)."""
    max_mean_drop: float = Field(default=0.01, ge=0, le=1)
    max_site_drop: float = Field(default=0.03, ge=0, le=1)
    min_dice: float = Field(default=-0.001, ge=-1, le=1)
    screen_updates: bool = True
    """Leave out of a candidate each update whose presence lowers its validation Dice by more
    than ``max_influence_drop`` (:mod:`federation.screening`; FedBuff models only)."""
    max_influence_drop: float = Field(default=0.005, ge=0, le=1)
    lift_weakest_site: list[Annotated[int, Field(ge=2, le=10)]] = Field(default_factory=list)
    """After screening, count the update that helps the lowest-scoring validation site this
    many times, trying each factor (:mod:`federation.fairness`; needs ``screen_updates``).
    Empty (default): off."""
    lift_max_mean_cost: float = Field(default=0.005, ge=0, le=1)
    """Mean validation Dice a lift may cost against the plain candidate."""
    step_fractions: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.5, 0.25])
    """A rejected FedBuff candidate is tried again at these fractions of its step, in order;
    the first the gate promotes is kept (:mod:`federation.backtrack`). Empty: off."""
    validation_dir: Path | None = None
    """Folder of validation cases (``site-<S>-<i>.npz``); default ``<data_dir>/validation``."""
    threads: int | None = Field(default=None, ge=1, le=256)


class FederationConfig(LayeredSettings):
    """Everything the federation server needs, with defaults that run out of the box."""

    model_config = SettingsConfigDict(
        extra="forbid", frozen=True, env_prefix=ENV_PREFIX, env_nested_delimiter="__",
        case_sensitive=False,
    )
    short_env_names = {  # noqa: RUF012 - ClassVar declared on LayeredSettings
        "DAFNE_FED_DB_URL": ("database", "url"),
        "DAFNE_FED_DATA_DIR": ("server", "data_dir"),
    }

    server: ServerSection = ServerSection()
    database: DatabaseSection = DatabaseSection()
    storage: StorageSection = StorageSection()
    signing: SigningSection = SigningSection()
    aggregation: AggregationSection = AggregationSection()
    gate: GateSection = GateSection()

    @property
    def database_url(self) -> str:
        """The configured URL, or SQLite inside the data directory."""
        return self.database.url or \
            f"sqlite:///{self.server.data_dir.resolve() / 'federation.db'}"

    @property
    def storage_location(self) -> str:
        """The configured artifact store, or ``<data_dir>/artifacts``."""
        return self.storage.location or str(self.server.data_dir / "artifacts")

    @property
    def key_file(self) -> Path:
        """The signing key's file."""
        return self.signing.key_file or self.server.data_dir / "signing-key.pem"

    @property
    def admin_token_file(self) -> Path:
        """The file holding the admin token's sha256."""
        return self.server.admin_token_file or self.server.data_dir / "admin-token.sha256"

    @property
    def validation_dir(self) -> Path:
        """The validation set's folder."""
        return self.gate.validation_dir or self.server.data_dir / "validation"

    def gate_rule_for(self, strategy: str) -> Literal["relative", "absolute"]:
        """The configured rule, or the one that goes with ``strategy`` (Dafne's: absolute)."""
        if self.gate.rule is not None:
            return self.gate.rule
        return "absolute" if strategy == "dafne" else "relative"


def load_federation_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> FederationConfig:
    """The server's configuration: ``path``, ``DAFNE_FED_*`` variables, then ``overrides``.

    Raises
    ------
    ConfigError
        Naming the file and every invalid key.
    """
    return load_settings(FederationConfig, path, environ=environ, overrides=overrides)
