"""Models and their generations: list, latest (cheap to poll), manifest, weights, history.

A node polls ``…/generations/latest`` with ``If-None-Match``; the answer is ``304`` until a
new generation is promoted, so polling costs one indexed query. It then downloads the
manifest (signed bytes, signature in the ``Dafne-Signature`` header) and the weights, and
verifies both with the server's public key it was configured with.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response

from db import federation as repo
from db.fed_models import FedGeneration
from federation.api.deps import ActorDep, ContextDep, SessionDep, model_for
from federation.api.schemas import GenerationInfo, GenerationSummary, ModelInfo, errors

router = APIRouter(tags=["models"])

SIGNATURE_HEADER = "Dafne-Signature"


@router.get("/v1/models", response_model=list[ModelInfo], responses=errors(401),
            summary="Models the caller may pull or push")
def list_models(caller: ActorDep, session: SessionDep) -> list[ModelInfo]:
    """Every model the caller holds a right on, with its latest generation number."""
    out = []
    for model in repo.list_models(session):
        if caller.is_admin:
            can_pull, can_push = True, False
        else:
            assert caller.node_id is not None
            rights = repo.node_rights(session, caller.node_id, model.name)
            if rights is None or not (rights.can_pull or rights.can_push):
                continue
            can_pull, can_push = rights.can_pull, rights.can_push
        latest = repo.latest_generation(session, model.name)
        out.append(ModelInfo(name=model.name, architecture=model.manifest["architecture"]["id"],
                             latest_generation=latest.number if latest else None,
                             can_pull=can_pull, can_push=can_push))
    return out


def _info(model_name: str, generation: FedGeneration) -> GenerationInfo:
    assert generation.number is not None and generation.signature is not None
    base = f"/v1/models/{model_name}/generations/{generation.number}"
    return GenerationInfo(
        model=model_name, number=generation.number, sha256=generation.sha256,
        signature=generation.signature, size_bytes=generation.size_bytes,
        created_at=generation.created_at, parent=generation.parent_number,
        validation=generation.validation, manifest_url=f"{base}/manifest",
        weights_url=f"{base}/weights")


@router.get("/v1/models/{model}/generations/latest", response_model=GenerationInfo,
            responses=errors(304, 401, 403, 404),
            summary="The latest promoted generation (ETag; cheap to poll)")
def latest_generation(model: str, request: Request, response: Response, caller: ActorDep,
                      session: SessionDep) -> GenerationInfo | Response:
    """The newest promoted generation; ``304`` when ``If-None-Match`` names it already."""
    model_for(session, caller, model, "pull")
    latest = repo.latest_generation(session, model)
    if latest is None:
        raise HTTPException(404, f"model {model!r} has no promoted generation")
    etag = f'"{model}-{latest.number}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return _info(model, latest)


def _promoted(session: SessionDep, model: str, number: int) -> FedGeneration:
    generation = repo.get_generation(session, model, number)
    if generation is None or generation.manifest_key is None:
        raise HTTPException(404, f"model {model!r} has no promoted generation {number}")
    return generation


@router.get("/v1/models/{model}/generations/{number}/manifest",
            responses={200: {"content": {"application/json": {}},
                             "description": "The signed manifest bytes; the Ed25519 signature "
                                            "(base64) is in the Dafne-Signature header"},
                       **errors(401, 403, 404)},
            summary="A generation's signed manifest")
def manifest(model: str, number: int, caller: ActorDep, session: SessionDep,
             context: ContextDep) -> Response:
    """The exact bytes that were signed, so a node verifies them byte for byte."""
    model_for(session, caller, model, "pull")
    generation = _promoted(session, model, number)
    assert generation.manifest_key is not None and generation.signature is not None
    return Response(context.store.get(generation.manifest_key), media_type="application/json",
                    headers={SIGNATURE_HEADER: generation.signature})


@router.get("/v1/models/{model}/generations/{number}/weights",
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "safetensors weights; ETag is their sha256"},
                       **errors(401, 403, 404)},
            summary="A generation's weights (safetensors)")
def weights(model: str, number: int, caller: ActorDep, session: SessionDep,
            context: ContextDep) -> Response:
    """The weights file whose sha256 the signed manifest names."""
    model_for(session, caller, model, "pull")
    generation = _promoted(session, model, number)
    return Response(context.store.get(generation.weights_key),
                    media_type="application/octet-stream",
                    headers={"ETag": f'"{generation.sha256}"'})


@router.get("/v1/models/{model}/generations", response_model=list[GenerationSummary],
            responses=errors(401, 403, 404),
            summary="Every candidate: promoted or rejected, scores, updates, reason")
def generations(model: str, caller: ActorDep, session: SessionDep) -> list[GenerationSummary]:
    """The model's history, oldest first, rejected candidates included (kept for audit)."""
    model_for(session, caller, model, "pull")
    return [GenerationSummary(
        id=g.id, number=g.number, state=str(g.state), parent=g.parent_number,
        strategy=g.strategy, validation=g.validation, reason=g.reason, updates=update_ids,
        created_at=g.created_at, decided_at=g.decided_at)
        for g, update_ids in repo.list_generations(session, model)]
