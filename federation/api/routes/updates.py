"""Uploading an update and asking for its state.

The body is read in chunks and refused (413) as soon as it passes the size limit, so a
hostile client cannot make the server buffer more than ``max_update_mb``. The checks and
the recording run in a worker thread (:func:`federation.intake.receive_update`); the
answer is stored under the node's ``Idempotency-Key`` and replayed for a retry.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from db import federation as repo
from federation.api.deps import ActorDep, ContextDep, SessionDep, model_for
from federation.api.schemas import UpdateInfo, errors
from federation.intake import receive_update, update_info

router = APIRouter(tags=["updates"])

_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"update of {declared} bytes exceeds the limit of "
                                 f"{limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"update exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "/v1/models/{model}/updates", status_code=202, response_model=UpdateInfo,
    responses={200: {"model": UpdateInfo, "description": "Replay of an accepted key"},
               **errors(400, 401, 403, 404, 409, 413, 422)},
    openapi_extra={"requestBody": {
        "required": True, "description": "An encoded update (dafne-update/1, safetensors)",
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}}}},
    summary="Upload a weight delta (idempotent per Idempotency-Key)")
async def upload(model: str, request: Request, caller: ActorDep, session: SessionDep,
                 context: ContextDep, *,
                 idempotency_key: str | None = Header(default=None)) -> JSONResponse:
    """Check and queue one update; its answer is replayed for the same key."""
    if idempotency_key is None or not _KEY.match(idempotency_key):
        raise HTTPException(400, "Idempotency-Key header of 1-128 characters [A-Za-z0-9._:-] "
                                 "is required")
    row = await run_in_threadpool(model_for, session, caller, model, "push")
    node = await run_in_threadpool(repo.get_node, session, caller.name)
    assert node is not None
    # End the read transaction first: a slow body must never hold the database (on SQLite
    # every transaction holds the write lock).
    await run_in_threadpool(session.commit)
    body = await _read_body(request, context.limits.max_bytes)

    def receive() -> tuple[int, dict[str, object], bool]:
        result = receive_update(
            session, context.store, model=row, node=node, idempotency_key=idempotency_key,
            body=body, limits=context.limits, reference=lambda: context.reference_shapes(row))
        session.commit()
        return result

    status, answer, replayed = await run_in_threadpool(receive)
    if status >= 400:
        request.state.reason = answer.get("detail")
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return JSONResponse(answer, status_code=status, headers=headers)


@router.get("/v1/updates/{update_id}", response_model=UpdateInfo,
            responses=errors(401, 404), summary="The state of an update")
def get_update(update_id: str, caller: ActorDep, session: SessionDep) -> UpdateInfo:
    """Pending, applied (with the generation), rejected or refused (with the reason)."""
    update = repo.get_update(session, update_id)
    if update is None or (not caller.is_admin and update.node_id != caller.node_id):
        raise HTTPException(404, f"no update {update_id!r} of this node")
    number = update.generation.number if update.generation is not None else None
    return UpdateInfo.model_validate(update_info(update, number))
