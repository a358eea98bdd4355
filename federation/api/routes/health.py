"""``GET /v1/health``: is the API up and its database reachable (no token needed)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from federation.api.deps import SessionDep

router = APIRouter(tags=["health"])


@router.get("/v1/health", summary="Liveness and database check")
def health(session: SessionDep) -> dict[str, str]:
    """Answer ``{"status": "ok"}`` once the database answers (for load balancers)."""
    session.execute(text("SELECT 1"))
    return {"status": "ok"}
