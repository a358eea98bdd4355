"""The federation API as a FastAPI app: built from a configuration, no I/O at import.

``dafne-federation serve`` builds one app per process and hands it to uvicorn; any number
of such processes can share one PostgreSQL database and one artifact store, because an API
process keeps no state of its own (aggregation runs in ``dafne-federation worker``).

Every request under ``/v1/`` except the health check is written to the audit log: who (the
node's name, ``admin``, or nobody for a missing or bad token), what, the status and, for a
refusal, the reason — the same row also records when the node was last seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dafne_node import __version__
from dafne_node.model.architectures import build_model
from db import federation as repo
from db.base import utcnow
from db.fed_models import FedModel
from db.session import make_engine, make_session_factory
from federation.api.deps import ServerContext
from federation.api.routes import admin, health, models, updates
from federation.config import FederationConfig
from federation.intake import IntakeLimits
from federation.storage import ArtifactStore, open_store

__all__ = ["create_app", "read_admin_token_hash"]

LOGGER = logging.getLogger(__name__)

_UNAUDITED = {"/v1/health"}


def read_admin_token_hash(config: FederationConfig) -> str | None:
    """The admin token's sha256 from its file, or None (admin endpoints then refuse all)."""
    try:
        value = config.admin_token_file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        LOGGER.warning("no admin token at %s: admin endpoints refuse every caller "
                       "(dafne-federation init creates one)", config.admin_token_file)
        return None
    return value or None


def _reference_shapes(cache: dict[str, Mapping[str, torch.Tensor]]
                      ) -> Callable[[FedModel], Mapping[str, torch.Tensor]]:
    def shapes(model: FedModel) -> Mapping[str, torch.Tensor]:
        if model.name not in cache:
            spec = model.manifest["architecture"]
            network = build_model(spec["id"], spec["params"])
            cache[model.name] = {name: torch.empty(t.shape, dtype=t.dtype, device="meta")
                                 for name, t in network.state_dict().items()}
        return cache[model.name]
    return shapes


def create_app(config: FederationConfig, *, sessions: sessionmaker[Session] | None = None,
               store: ArtifactStore | None = None) -> FastAPI:
    """Build the API of one server process.

    Parameters
    ----------
    config:
        The validated configuration.
    sessions:
        Session factory on the federation database (default: from ``config``).
    store:
        Artifact store (default: ``config.storage_location``).
    """
    sessions = sessions or make_session_factory(make_engine(config.database_url))
    context = ServerContext(
        config=config, sessions=sessions, store=store or open_store(config.storage_location),
        admin_token_sha256=read_admin_token_hash(config),
        limits=IntakeLimits.from_config(config.server.max_update_mb, config.aggregation),
        reference_shapes=_reference_shapes({}))
    app = FastAPI(
        title="Dafne federation API", version=__version__,
        description="Nodes upload weight deltas (never images) and pull signed, validated "
                    "model generations. Every endpoint but /v1/health needs "
                    "`Authorization: Bearer <token>`; errors are `{\"detail\": reason}`.")
    app.state.federation = context
    for router in (health.router, models.router, updates.router, admin.router):
        app.include_router(router)

    @app.exception_handler(HTTPException)
    async def remember_reason(request: Request, exc: HTTPException) -> Response:
        request.state.reason = str(exc.detail)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def one_line_reason(request: Request, exc: RequestValidationError) -> Response:
        """Bad parameters get the same ``{"detail": "<reason>"}`` as every other error."""
        reason = "; ".join(
            f"{' '.join(str(part) for part in error.get('loc', ()))}: {error.get('msg')}"
            for error in exc.errors())
        request.state.reason = reason
        return JSONResponse({"detail": reason}, status_code=422)

    app.add_middleware(AuditMiddleware, sessions=sessions)
    return app


class AuditMiddleware:
    """Writes one audit row per ``/v1/`` request once the request is completely finished.

    A plain ASGI middleware rather than ``@app.middleware("http")``: the row is written
    after the route's own session is closed, so on SQLite the audit write never waits for
    the lock of the request it records.
    """

    def __init__(self, app: ASGIApp, *, sessions: sessionmaker[Session]) -> None:
        self._app = app
        self._sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, remember its status, then record it."""
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/") or path in _UNAUDITED:
            await self._app(scope, receive, send)
            return
        status = 500

        async def remember_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, remember_status)
        finally:
            state = scope.get("state", {})
            client = scope.get("client")
            entry = {"actor": state.get("caller"), "method": scope["method"], "path": path,
                     "status": status, "reason": state.get("reason"),
                     "client": client[0] if client else None}
            await run_in_threadpool(_write_audit, self._sessions, entry)


def _write_audit(sessions: sessionmaker[Session], entry: dict[str, Any]) -> None:
    """One audit row; a node's last contact is updated in the same transaction."""
    try:
        with sessions() as session, session.begin():
            repo.audit(session, **entry)
            node = repo.get_node(session, entry["actor"]) if entry["actor"] else None
            if node is not None:
                repo.touch_node(session, node, utcnow())
    except Exception:  # the answer is already decided; a lost audit row is logged loudly
        LOGGER.exception("could not write the audit row for %s %s (%d)", entry["method"],
                         entry["path"], entry["status"])
