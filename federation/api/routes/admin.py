"""Admin endpoints (admin token only): the server's status, its nodes, the audit log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from db import federation as repo
from federation.api.deps import AdminDep, SessionDep
from federation.api.schemas import NodeInfo, errors

router = APIRouter(tags=["admin"])


@router.get("/v1/admin/status", responses=errors(401, 403),
            summary="Generations, pending and refused updates, last contact of each node")
def status(_: AdminDep, session: SessionDep) -> dict[str, Any]:
    """What ``dafne-federation status --json`` prints."""
    return repo.federation_status(session)


@router.get("/v1/admin/nodes", response_model=list[NodeInfo], responses=errors(401, 403),
            summary="Node identities and their rights (never tokens)")
def nodes(_: AdminDep, session: SessionDep) -> list[NodeInfo]:
    """Every node, revoked ones included."""
    return [NodeInfo(name=n.name, created_at=n.created_at, revoked_at=n.revoked_at,
                     last_seen_at=n.last_seen_at,
                     models={r.model_name: {"pull": r.can_pull, "push": r.can_push}
                             for r in n.rights})
            for n in repo.list_nodes(session)]


@router.get("/v1/admin/audit", responses=errors(401, 403),
            summary="The latest audit entries, newest first")
def audit(_: AdminDep, session: SessionDep,
          limit: int = Query(default=100, ge=1, le=10_000)) -> list[dict[str, Any]]:
    """Every accepted and refused request: when, who, what, status, reason, from where."""
    return [{"at": a.at.isoformat(), "actor": a.actor, "method": a.method, "path": a.path,
             "status": a.status, "reason": a.reason, "client": a.client}
            for a in repo.recent_audit(session, limit)]
