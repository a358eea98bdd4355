"""``GET /health``: whether this node can do its work right now.

For load balancers, systemd watchdogs and container orchestrators: 200 when the database
answers ``SELECT 1`` and the node says it is ready, 503 with the reason otherwise. It checks
the database for real (a node whose database is gone accepts nothing) and nothing more
expensive, because it is polled every few seconds.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from dafne_node.api.deps import ContextDep, SessionDep
from dafne_node.api.schemas import HealthResponse

__all__ = ["router"]

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "database unreachable or not ready"}},
)
def health(context: ContextDep, session: SessionDep) -> JSONResponse:
    """200 if the database answers and the node is ready, else 503 naming the problem."""
    problems: list[str] = []
    database = "ok"
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        reason = str(error.orig if getattr(error, "orig", None) is not None else error)
        database = f"unreachable: {reason.splitlines()[0] if reason else type(error).__name__}"
        problems.append(f"database {database}")
        LOGGER.warning("health check: database %s", database)
    ready = True
    if context.ready is not None:
        try:
            ready = bool(context.ready())
        except Exception:  # a broken readiness probe means "not ready", not a 500
            LOGGER.exception("health check: readiness callback raised")
            ready = False
        if not ready:
            problems.append("node is not ready (starting or shutting down)")
    body = HealthResponse(
        status="unavailable" if problems else "ok",
        database=database,
        ready=ready,
        detail="; ".join(problems) or None,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if problems else 200)
