"""The node's configuration: one TOML file, environment overrides, validated at start.

Hospital IT edits one file; containers and systemd units override single values
with ``DAFNE_*`` variables. Every value is checked before anything starts, and
an error names the key (``dicom.port``) and what is wrong with it, because a
node that starts with a typo and fails at 3 a.m. is worse than one that refuses
to start.

Environment variables: ``DAFNE_<SECTION>__<KEY>`` sets any key (for example
``DAFNE_DICOM__PORT=104``); the common ones also have short names, listed in
:data:`SHORT_ENV_NAMES` (``DAFNE_DB_URL``, ``DAFNE_DATA_DIR`` …).

The layers are pydantic-settings sources, highest first: command-line flags (init
arguments), ``DAFNE_*`` variables, their short names, the TOML file, the defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from dafne_node.learning.windows import TrainingWindow
from dafne_node.settings import ConfigError, LayeredSettings, load_settings
from dafne_node.settings import Section as _Section

ENV_PREFIX = "DAFNE_"

SHORT_ENV_NAMES: dict[str, tuple[str, str]] = {
    "DAFNE_DATA_DIR": ("node", "data_dir"),
    "DAFNE_DB_URL": ("database", "url"),
    "DAFNE_AE_TITLE": ("dicom", "ae_title"),
    "DAFNE_PORT": ("dicom", "port"),
    "DAFNE_HTTP_PORT": ("http", "port"),
    "DAFNE_QUIET_PERIOD": ("assembly", "quiet_period_s"),
}
"""Short environment variable names for the settings people change most."""

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(stripped) or "\\" in stripped:
        raise ValueError("an AE title is 1-16 printable characters without backslash")
    return stripped


class NodeSection(_Section):
    """Where the node keeps its state."""

    data_dir: Path = Path("dafne-data")
    name: str = "dafne-node"


class Caller(_Section):
    """A modality or PACS allowed to send to the node."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class DicomSection(_Section):
    """The DICOM Storage SCP."""

    ae_title: str = "DAFNE"
    bind: str = "0.0.0.0"  # a DICOM node listens on the hospital network
    port: int = Field(default=11112, ge=1, le=65535)
    max_associations: int = Field(default=16, ge=1, le=256)
    allowed_callers: list[Caller] = Field(default_factory=list)
    min_free_disk_mb: int = Field(default=1024, ge=0)
    association_request_timeout_s: float = Field(default=5.0, gt=0, le=60)
    """A connection that has not sent its whole association request by then is closed."""
    max_waiting_per_address: int = Field(default=8, ge=1, le=1024)
    """Connections one address may have waiting for their association request."""
    max_instance_mb: int = Field(default=256, ge=1, le=16384)
    """Largest instance accepted (inflated, for deflate); each association may hold one in
    memory while it arrives, so this times max_associations bounds the receiver's memory."""

    _ae = field_validator("ae_title")(_check_ae_title)


class HttpSection(_Section):
    """The admin HTTP API (health, status, metrics)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=1, le=65535)


class DatabaseSection(_Section):
    """SQLite in the data directory unless a URL is given (PostgreSQL for production)."""

    url: str | None = None


class AssemblySection(_Section):
    """When a series counts as complete."""

    quiet_period_s: float = Field(default=10.0, gt=0, le=3600)


class Destination(_Section):
    """A DICOM node that receives SEGs, usually the PACS."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(_check_ae_title)


class Route(_Section):
    """Which series are segmented by which model and where the SEG goes.

    Every given condition must match; absent ones match anything.
    """

    name: str
    calling_ae: str | None = None
    modality: str | None = "MR"
    body_part: str | None = None
    series_description: str | None = None
    image_type: str | None = None
    min_slices: int = Field(default=1, ge=1)
    model: str = "default"
    destinations: list[str] = Field(default_factory=list)

    @field_validator("series_description")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class SendingSection(_Section):
    """Retries of C-STORE to destinations, with exponential back-off.

    The defaults keep trying for about three hours, long enough for a PACS
    maintenance window, before a delivery is failed and shown to IT.
    """

    max_attempts: int = Field(default=20, ge=1, le=100)
    backoff_initial_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=900.0, gt=0)


class ModelSection(_Section):
    """The model directory to use; the bundled default model when unset."""

    dir: Path | None = None
    precision: str = Field(default="auto", pattern="^(auto|bf16|fp32)$")


class CorrectionsSection(_Section):
    """How SEGs that come back from viewers are understood."""

    label_aliases: dict[str, list[str]] = Field(default_factory=dict)
    """Extra segment labels per model label key, e.g. ``soleus = ["SOL", "m. soleus"]``,
    for viewers that keep only the segment's name (OHIF replaces the codes)."""


class TrainingSection(_Section):
    """When and how the node learns from corrections (the trainer process).

    The defaults train every night from 01:00 for at most four hours (UTC: set the zone of
    the hospital), once three new examples wait, with one CPU thread so that inference
    keeps the rest of the machine.
    """

    enabled: bool = True
    """``serve`` starts the trainer process; off for nodes that only segment."""
    windows: list[TrainingWindow] = Field(default_factory=lambda: [TrainingWindow()])
    min_new_examples: int = Field(default=3, ge=1)
    """A window trains only when at least this many examples arrived since the last run."""
    activate_local_model: bool = True
    """An accepted run's model becomes the node's model at once (new SEGs name it)."""
    threads: int = Field(default=1, ge=1, le=256)
    """CPU threads for training; inference keeps the others."""
    compile: bool = False
    """Compile the network for bf16 training (``torch.compile``): each step 1.2x (16 base
    channels) to 1.4x (24) faster, after a compile of 30-60 s on the trainer's first run
    (seconds later, from inductor's disk cache). Needs a C++ compiler; without one the
    trainer warns and trains uncompiled. fp32 training (a CPU without bf16) ignores it."""
    steps: int = Field(default=150, ge=1)
    """Optimiser steps of one run (8 slices each)."""
    learning_rate: float = Field(default=1e-3, gt=0, le=1)
    contrast_fold: float = Field(default=0.0, ge=0, le=1)
    """Probability that a training slice's contrast is folded like fat suppression (bright
    fat dark, muscle bright), so that updates from T1 and fat-suppressed sites agree."""
    max_dice_drop: float = Field(default=0.02, ge=0, le=1)
    """The local gate: the largest loss of held-out Dice a run may cause."""
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Share of the local examples held out for the gate (never trained on)."""
    replay_fraction: float = Field(default=0.5, ge=0, lt=1)
    """Share of a run's examples replayed from earlier corrections (against forgetting)."""
    seed: int = 0
    checkpoint_every_steps: int = Field(default=25, ge=1)
    """A killed trainer loses at most this many steps of its run."""
    check_every_s: float = Field(default=30.0, ge=0.1, le=3600)
    """How often the trainer looks for an open window and waiting examples."""


class FederationSection(_Section):
    """The federation server this node shares weight deltas with and pulls generations from.

    Off unless ``url`` is set. Then the node needs its token (``token``, or ``token_file``
    read at each use, so IT can rotate it without a restart) and the server's Ed25519
    public key, which is the only key a pulled generation is verified with: a key offered
    by the server itself would prove nothing.
    """

    url: str | None = None
    """Base URL of the federation API (``https://federation.example.org``); none: off."""
    model: str = Field(default="leg", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    """The federation's name of the model this node trains and pulls."""
    token: SecretStr | None = None
    token_file: Path | None = None
    public_key: str | None = None
    """``ed25519:<base64>`` as printed by ``dafne-federation init``, or a PEM file path."""
    poll_interval_s: float = Field(default=300.0, ge=0.5, le=86400)
    ca_file: Path | None = None
    """CA bundle for the server's certificate; the system's CAs when unset."""
    verify_tls: bool = True
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    upload_encoding: Literal["fp16", "int8", "topk-int8"] = "topk-int8"
    upload_density: float = Field(default=0.2, gt=0, le=1)
    """Share of each large tensor's entries a ``topk-int8`` upload keeps."""
    retry_initial_s: float = Field(default=5.0, gt=0)
    retry_max_s: float = Field(default=900.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @property
    def enabled(self) -> bool:
        """Whether the node federates."""
        return self.url is not None

    def bearer_token(self) -> str:
        """The node's token: ``token``, or the content of ``token_file`` read now.

        Raises
        ------
        ConfigError
            If neither is set, or the file is missing, unreadable or empty.
        """
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is None:
            raise ConfigError("federation.token: required when federation.url is set "
                              "(or federation.token_file)")
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise ConfigError(f"federation.token_file: {self.token_file}: no such file"
                              ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"federation.token_file: {self.token_file}: cannot be read "
                              f"({exc})") from None
        if not token:
            raise ConfigError(f"federation.token_file: {self.token_file} is empty")
        return token


class RetentionSection(_Section):
    """How long received images and training examples are kept.

    A series is never removed while it is being received or processed, nor while a
    correction of it waits for training, nor for ``keep_after_training_days`` after a run
    learned from it.
    """

    spool_max_age_days: float = Field(default=30.0, gt=0)
    """Received series older than this are removed from the spool."""
    spool_max_gb: float | None = Field(default=None, gt=0)
    """Beyond this size the oldest removable series go first; no limit when unset."""
    keep_after_training_days: float = Field(default=30.0, ge=0)
    """A trained example (and its series) stays this long, for replay in later runs."""
    check_every_h: float = Field(default=1.0, gt=0, le=168)


class NodeConfig(LayeredSettings):
    """Everything a node needs, with defaults that run out of the box."""

    model_config = SettingsConfigDict(
        extra="forbid", frozen=True, env_prefix=ENV_PREFIX, env_nested_delimiter="__",
        case_sensitive=False,
    )
    short_env_names = SHORT_ENV_NAMES

    node: NodeSection = NodeSection()
    dicom: DicomSection = DicomSection()
    http: HttpSection = HttpSection()
    database: DatabaseSection = DatabaseSection()
    assembly: AssemblySection = AssemblySection()
    destinations: list[Destination] = Field(default_factory=list)
    default_destination: str | None = None
    routes: list[Route] = Field(default_factory=list)
    sending: SendingSection = SendingSection()
    model: ModelSection = ModelSection()
    corrections: CorrectionsSection = CorrectionsSection()
    training: TrainingSection = TrainingSection()
    retention: RetentionSection = RetentionSection()
    federation: FederationSection = FederationSection()

    @property
    def database_url(self) -> str:
        """The configured URL, or SQLite inside the data directory."""
        return self.database.url or f"sqlite:///{self.node.data_dir.resolve() / 'dafne.db'}"

    @property
    def spool_dir(self) -> Path:
        """Where received instances are stored."""
        return self.node.data_dir / "spool"

    def destination(self, name: str) -> Destination:
        """The destination called ``name``.

        Raises
        ------
        ConfigError
            If there is none.
        """
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise ConfigError(f"destinations: no destination named {name!r}")


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> NodeConfig:
    """The node's configuration (:func:`dafne_node.settings.load_settings`), checked across keys.

    Beyond each key's own validation: every destination a route or ``default_destination``
    names exists, and a federating node has one token source and a readable public key.

    Raises
    ------
    ConfigError
        Naming the file and every invalid key with the reason.
    """
    config = load_settings(NodeConfig, path, environ=environ, overrides=overrides)
    source = str(path) if path is not None else "defaults"
    _check_references(config, source)
    _check_federation(config.federation, source)
    return config


def _check_references(config: NodeConfig, source: str) -> None:
    names = {destination.name for destination in config.destinations}
    wanted = [(f"routes.{route.name}.destinations", name)
              for route in config.routes for name in route.destinations]
    if config.default_destination is not None:
        wanted.append(("default_destination", config.default_destination))
    for key, name in wanted:
        if name not in names:
            raise ConfigError(f"{source}: {key}: no destination named {name!r}")


def _check_federation(federation: FederationSection, source: str) -> None:
    """With a URL, the node needs one token source and a readable public key."""
    if not federation.enabled:
        return
    if federation.token is not None and federation.token_file is not None:
        raise ConfigError(f"{source}: federation.token_file: give federation.token or "
                          "federation.token_file, not both")
    try:
        federation.bearer_token()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if federation.public_key is None or not federation.public_key.strip():
        raise ConfigError(f"{source}: federation.public_key: required when federation.url is "
                          "set (the server's key, as printed by `dafne-federation init`)")
    # Imported here: the key check needs cryptography, only federating nodes pay for it.
    from dafne_node.model.signature import PublicKeyError, parse_public_key  # noqa: PLC0415

    try:
        parse_public_key(federation.public_key)
    except PublicKeyError as exc:
        raise ConfigError(f"{source}: federation.public_key: {exc}") from None
    if federation.ca_file is not None and not federation.ca_file.is_file():
        raise ConfigError(f"{source}: federation.ca_file: {federation.ca_file}: no such file")
