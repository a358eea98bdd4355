"""Layered settings: one TOML file, environment overrides and flags, validated at start.

The node (``dafne-node``) and the federation server (``dafne-federation``) configure the same
way, so hospital IT and the federation's operators learn one scheme: a TOML file, any key
overridden by ``<PREFIX><SECTION>__<KEY>`` environment variables, a few common keys with
short variable names, and command-line flags above all. Every value is checked before
anything starts, and an error names the key (``dicom.port``) and what is wrong with it,
because a service that starts with a typo and fails at 3 a.m. is worse than one that
refuses to start.

The layers are pydantic-settings sources, highest first: flags (init arguments), the
prefixed variables, their short names, the TOML file, the defaults.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

__all__ = ["ConfigError", "LayeredSettings", "Section", "load_settings"]


class ConfigError(ValueError):
    """The configuration is invalid; the message names each bad key."""


class Section(BaseModel):
    """One ``[section]`` of a configuration file: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class _Sources:
    """Where one :func:`load_settings` call reads from (the environment may be a test's)."""

    path: Path | None
    environ: Mapping[str, str]


_SOURCES: ContextVar[_Sources | None] = ContextVar("dafne_settings_sources", default=None)


class _Environment(EnvSettingsSource):
    """``<PREFIX><SECTION>__<KEY>`` variables, from the mapping this load was given."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty,
                              self.env_parse_none_str)


class _ShortNames(PydanticBaseSettingsSource):
    """The short variables of the settings class (``DAFNE_DB_URL`` …)."""

    def __init__(self, settings_cls: type[LayeredSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._names = settings_cls.short_env_names
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # values come whole from __call__

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, (section, key) in self._names.items():
            if name in self._environ:
                values.setdefault(section, {})[key] = self._environ[name]
        return values


class LayeredSettings(BaseSettings):
    """Settings read by :func:`load_settings`: flags, variables, short names, TOML, defaults.

    Subclasses set ``model_config`` (``env_prefix``, ``env_nested_delimiter="__"``) and
    :attr:`short_env_names`.
    """

    short_env_names: ClassVar[dict[str, tuple[str, str]]] = {}
    """Short environment variable names for the settings people change most."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then prefixed variables, then short names, then the TOML file."""
        sources = _SOURCES.get() or _Sources(None, os.environ)
        chain: list[PydanticBaseSettingsSource] = [
            init_settings,
            _Environment(settings_cls, sources.environ),
            _ShortNames(cls, sources.environ),
        ]
        if sources.path is not None:
            chain.append(TomlConfigSettingsSource(settings_cls, toml_file=sources.path))
        return tuple(chain)


S = TypeVar("S", bound=LayeredSettings)


def load_settings(
    cls: type[S],
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> S:
    """Read ``path`` (if any), apply environment variables then ``overrides``, validate.

    ``overrides`` are command-line flags, keyed by their path in the file
    (``("dicom", "port")``); they win over the environment, which wins over the file.

    Raises
    ------
    ConfigError
        Naming the file and every invalid key with the reason.
    """
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no such configuration file") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    flags: dict[str, Any] = {}
    for keys, value in (overrides or {}).items():
        if value is not None:
            _set(flags, keys, value)
    token = _SOURCES.set(_Sources(path, os.environ if environ is None else environ))
    try:
        return cls(**flags)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from exc
    finally:
        _SOURCES.reset(token)


def _set(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    """Put a flag's value at its path in the nested init arguments."""
    target = raw
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value
