"""Request and response schemas of the federation API (never ORM rows).

Each error answer is ``{"detail": "<reason>"}`` (plus ``update_id`` for refused uploads);
:func:`errors` documents which statuses an endpoint can answer, so the OpenAPI schema lists
every error a client must handle.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ErrorBody",
    "GenerationInfo",
    "GenerationSummary",
    "ModelInfo",
    "NodeInfo",
    "UpdateInfo",
    "errors",
]


class _Schema(BaseModel):
    model_config = ConfigDict(frozen=True)


class ErrorBody(_Schema):
    """Every error: the reason, and for a refused upload the id it was recorded under."""

    detail: str
    update_id: str | None = None


class ModelInfo(_Schema):
    """A model the caller may pull or push."""

    name: str
    architecture: str
    latest_generation: int | None
    can_pull: bool
    can_push: bool


class GenerationInfo(_Schema):
    """A promoted generation: what a node needs to download and verify it."""

    model: str
    number: int
    sha256: str
    signature: str
    size_bytes: int
    created_at: datetime
    parent: int | None
    validation: dict[str, Any] | None
    manifest_url: str
    weights_url: str


class GenerationSummary(_Schema):
    """A candidate, promoted or rejected, with its scores and the updates it contains."""

    id: int
    number: int | None
    state: str
    parent: int | None
    strategy: str
    validation: dict[str, Any] | None
    reason: str | None
    updates: list[str]
    created_at: datetime
    decided_at: datetime | None


class UpdateInfo(_Schema):
    """An update's state as its node sees it."""

    id: str
    model: str
    state: str
    base_generation: int | None
    num_samples: int
    l2_norm: float | None
    clipped: bool
    received_at: datetime
    reason: str | None
    generation: int | None


class NodeInfo(_Schema):
    """A node identity (never its token)."""

    name: str
    created_at: datetime
    revoked_at: datetime | None
    last_seen_at: datetime | None
    models: dict[str, dict[str, bool]]


_ERRORS = {
    304: "Not modified: the ETag in If-None-Match is still current",
    400: "Bad request (e.g. a missing or malformed Idempotency-Key header)",
    401: "No bearer token, or an unknown or revoked one",
    403: "The token may not do this (no right on the model, or not the admin token)",
    404: "No such model, generation or update",
    409: "The update's base generation is unknown, too old or has another sha256",
    413: "The body exceeds the configured size limit",
    422: "Malformed update: format, metadata, dtype, shape, NaN/Inf or an outlier norm",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses an endpoint may answer."""
    return {status: ({"description": _ERRORS[status]} if status == 304 else
                     {"model": ErrorBody, "description": _ERRORS[status]})
            for status in statuses}
