"""``GET /status``: the same snapshot as ``dafne-node status --json``."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query

from dafne_node.api.deps import ContextDep, ModelDep, SessionDep
from dafne_node.status import DEFAULT_RECENT, NodeStatus, collect_status

__all__ = ["router"]

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["status"])


@router.get("/status", response_model=NodeStatus)
def status(
    session: SessionDep,
    model: ModelDep,
    context: ContextDep,
    recent: Annotated[
        int, Query(ge=0, le=1000, description="how many skipped series and failed jobs to list")
    ] = DEFAULT_RECENT,
) -> NodeStatus:
    """What was received, jobs, outbox, skipped series, the model and the federation sync."""
    return collect_status(
        session, model_name=model.name, model_generation=model.generation, recent=recent,
        windows=context.windows, data_dir=context.data_dir, federation=context.federation,
    )
