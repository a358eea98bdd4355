"""``GET /corrections``: the same list as ``dafne-node corrections --json``."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query

from dafne_node.api.deps import SessionDep
from dafne_node.status import CorrectionItem, correction_items
from db.node_models import CorrectionState

__all__ = ["router"]

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["corrections"])


@router.get("/corrections", response_model=list[CorrectionItem])
def corrections(
    session: SessionDep,
    state: Annotated[CorrectionState | None,
                     Query(description="only corrections in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[CorrectionItem]:
    """SEGs sent back from viewers, newest first: state, labels, Dice, reason."""
    return correction_items(session, limit=limit, state=state)
