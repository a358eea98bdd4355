"""Typed dependencies of the federation API: the server's context, a session, the caller.

Everything a route needs is on ``app.state`` (put there by :func:`federation.app.create_app`)
and reached through these dependencies, never through module globals, so importing the
package does no I/O and two apps in one process (tests) never share state.

Who is calling: every request but ``/v1/health`` carries ``Authorization: Bearer <token>``.
The admin token is compared with the sha256 that ``dafne-federation init`` stored; a node's
token is looked up by its sha256 in the database. The caller's name is kept on the request
for the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker

from db import federation as repo
from db.fed_models import FedModel
from federation.config import FederationConfig
from federation.intake import IntakeLimits
from federation.storage import ArtifactStore

__all__ = [
    "ActorDep",
    "AdminDep",
    "Caller",
    "ContextDep",
    "ServerContext",
    "SessionDep",
    "get_caller",
    "model_for",
]

LOGGER = logging.getLogger(__name__)


@dataclass
class ServerContext:
    """What the routes of one app share."""

    config: FederationConfig
    sessions: sessionmaker[Session]
    store: ArtifactStore
    admin_token_sha256: str | None
    limits: IntakeLimits
    reference_shapes: Callable[[FedModel], Mapping[str, torch.Tensor]]
    """Tensors with a model's names and shapes (on the meta device), for shape checks."""


def get_context(request: Request) -> ServerContext:
    """The :class:`ServerContext` of the app serving ``request``."""
    context: ServerContext = request.app.state.federation
    return context


ContextDep = Annotated[ServerContext, Depends(get_context)]


def get_session(context: ContextDep) -> Iterator[Session]:
    """A session for one request; a route that changes something commits before answering."""
    session = context.sessions()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: the admin, or a node (with its database id)."""

    kind: Literal["admin", "node"]
    name: str
    node_id: int | None = None

    @property
    def is_admin(self) -> bool:
        """Whether this is the admin token."""
        return self.kind == "admin"


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})


def get_caller(request: Request, context: ContextDep, session: SessionDep) -> Caller:
    """The caller behind the bearer token (401 with the reason if there is none)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("missing bearer token (Authorization: Bearer <token>)")
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    if context.admin_token_sha256 is not None \
            and hmac.compare_digest(digest, context.admin_token_sha256):
        caller = Caller("admin", "admin")
    else:
        node = repo.node_for_token(session, token)
        if node is None:
            raise _unauthorized("unknown or revoked token")
        caller = Caller("node", node.name, node.id)
    request.state.caller = caller.name
    return caller


ActorDep = Annotated[Caller, Depends(get_caller)]


def require_admin(caller: ActorDep) -> Caller:
    """The caller, if it is the admin (403 otherwise)."""
    if not caller.is_admin:
        raise HTTPException(403, "this endpoint needs the admin token")
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]


def model_for(session: Session, caller: Caller, model_name: str,
              right: Literal["pull", "push"]) -> FedModel:
    """The model ``model_name`` if the caller holds ``right`` on it (404 / 403 otherwise).

    The admin may pull everything and push nothing: updates come from nodes only.
    """
    model = repo.get_model(session, model_name)
    if model is None:
        raise HTTPException(404, f"no model named {model_name!r}")
    if caller.is_admin:
        if right == "push":
            raise HTTPException(403, "the admin token cannot push updates; use a node token")
        return model
    assert caller.node_id is not None
    rights = repo.node_rights(session, caller.node_id, model_name)
    allowed = rights is not None and (rights.can_pull if right == "pull" else rights.can_push)
    if not allowed:
        raise HTTPException(403, f"node {caller.name!r} may not {right} model {model_name!r}")
    return model
