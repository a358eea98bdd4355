"""Update intake: every check an upload must pass, each refusal with its reason.

An update comes from a hospital's node, but the server treats it as hostile until proven
otherwise: one NaN, one wrong shape or one delta scaled by 1e6 would poison every hospital's
next generation. The checks run in order of cost, and the first that fails decides the
answer:

1. size (413) — before the body is parsed;
2. format (422) — the update codec refuses anything that is not a well-formed update
   with finite values (:mod:`dafne_node.learning.update`);
3. model (422) — the update's architecture and model name are this model's;
4. base generation (409) — a promoted generation of this model, not older than
   ``max_staleness`` generations, and the update's ``base_sha256`` is that generation's;
5. shapes (422) — tensor for tensor, the model's state dict;
6. norm (422) — the delta's L2 norm is at most ``max_norm`` (clipping to ``clip_norm``
   happens at aggregation; this refuses the outliers that clipping would only hide).

The answer (status and body) is stored with the update under the node's idempotency key,
refusals included, so a node that retries after a lost response gets the first answer
again instead of a second update.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session

from dafne_node.learning.update import (
    UpdateFormatError,
    UpdateMetadata,
    check_matches,
    decode_update,
)
from db import federation as repo
from db.base import utcnow
from db.fed_models import FedModel, FedNode, FedUpdate, UpdateState
from federation.aggregate import l2_norm
from federation.config import AggregationSection
from federation.storage import ArtifactStore

__all__ = ["IntakeLimits", "Refusal", "receive_update", "update_info"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeLimits:
    """The bounds an update must respect (from ``[server]`` and ``[aggregation]``)."""

    max_bytes: int
    max_norm: float
    max_staleness: int

    @classmethod
    def from_config(cls, max_update_mb: float, aggregation: AggregationSection
                    ) -> IntakeLimits:
        """Limits from the configuration sections."""
        return cls(max_bytes=int(max_update_mb * 1024 * 1024),
                   max_norm=aggregation.max_norm, max_staleness=aggregation.max_staleness)


class Refusal(Exception):  # noqa: N818 - an outcome, not an error of the server
    """An update refused with an HTTP status and the reason the node is told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class _Checked:
    base_generation: int
    num_samples: int
    metrics: dict[str, Any]
    encoding: str
    norm: float
    continues: str | None


def update_info(update: FedUpdate, generation_number: int | None) -> dict[str, Any]:
    """The JSON a node sees for one of its updates (``UpdateInfo`` in the API)."""
    return {
        "id": update.id,
        "model": update.model_name,
        "state": str(update.state),
        "base_generation": update.base_generation,
        "num_samples": update.num_samples,
        "l2_norm": update.l2_norm,
        "clipped": update.clipped,
        "received_at": update.received_at.isoformat(),
        "reason": update.reason,
        "generation": generation_number,
    }


def _check(session: Session, model: FedModel, body: bytes, limits: IntakeLimits,
           reference: Callable[[], Mapping[str, torch.Tensor]]) -> _Checked:
    if len(body) > limits.max_bytes:
        raise Refusal(413, f"update of {len(body)} bytes exceeds the limit of "
                           f"{limits.max_bytes} bytes")
    try:
        decoded = decode_update(body, max_bytes=limits.max_bytes)
    except UpdateFormatError as exc:
        raise Refusal(422, f"malformed update: {exc}") from None
    meta = decoded.metadata
    seed_architecture = model.manifest["architecture"]["id"]
    if meta.architecture != seed_architecture:
        raise Refusal(422, f"update is for architecture {meta.architecture!r}, model "
                           f"{model.name!r} is {seed_architecture!r}")
    if meta.model_name != model.manifest["name"]:
        raise Refusal(422, f"update is for model {meta.model_name!r}, not "
                           f"{model.manifest['name']!r}")
    latest = repo.latest_generation(session, model.name)
    base = repo.get_generation(session, model.name, meta.base_generation)
    if latest is None or base is None or base.number is None:
        raise Refusal(409, f"base generation {meta.base_generation} of {model.name!r} is "
                           "not a promoted generation")
    if latest.number is not None and latest.number - base.number > limits.max_staleness:
        raise Refusal(409, f"base generation {base.number} is {latest.number - base.number} "
                           f"generations old (at most {limits.max_staleness}): pull "
                           f"generation {latest.number} and train again")
    if meta.base_sha256 != base.sha256:
        raise Refusal(409, f"base_sha256 {meta.base_sha256[:12]}… is not the sha256 of "
                           f"generation {base.number} ({base.sha256[:12]}…)")
    try:
        check_matches(decoded.tensors, reference())
    except UpdateFormatError as exc:
        raise Refusal(422, f"update does not fit the model: {exc}") from None
    norm = l2_norm(decoded.tensors)
    if norm > limits.max_norm:
        raise Refusal(422, f"update L2 norm {norm:.3g} exceeds the outlier bound "
                           f"{limits.max_norm:.3g}")
    return _Checked(base_generation=base.number, num_samples=meta.num_samples,
                    metrics=dict(meta.metrics), encoding=_encoding_summary(meta), norm=norm,
                    continues=meta.continues)


def _encoding_summary(meta: UpdateMetadata) -> str:
    """The encodings an update uses, e.g. ``topk-int8+fp16``."""
    return "+".join(sorted({str(info.encoding) for info in meta.tensors.values()}))


def receive_update(
    session: Session,
    store: ArtifactStore,
    *,
    model: FedModel,
    node: FedNode,
    idempotency_key: str,
    body: bytes,
    limits: IntakeLimits,
    reference: Callable[[], Mapping[str, torch.Tensor]],
) -> tuple[int, dict[str, Any], bool]:
    """Check and record one upload; return ``(status, body, replayed)`` for the response.

    A replay of ``idempotency_key`` returns the first answer unchanged. An accepted update
    is stored as an artifact before its row is committed, so a row never points at nothing.
    The caller commits.

    Parameters
    ----------
    session:
        Session on the federation database.
    store:
        Where an accepted update's bytes are kept until aggregation.
    model, node:
        The model pushed to and the authenticated node (rights already checked).
    idempotency_key:
        The node's key for this upload.
    body:
        The encoded update.
    limits:
        Size, norm and staleness bounds.
    reference:
        Returns tensors with the model's names and shapes (values unused), asked only
        once the cheaper checks have passed.
    """
    earlier = repo.find_update(session, node.id, idempotency_key)
    if earlier is not None:
        return earlier.response_status, earlier.response, True
    update_id = uuid.uuid4().hex
    artifact_key: str | None = None
    try:
        checked = _check(session, model, body, limits, reference)
    except Refusal as refusal:
        LOGGER.warning("update %s from node %s refused (%d): %s", update_id, node.name,
                       refusal.status, refusal.reason)
        state, status, checked_or_none = UpdateState.REFUSED, refusal.status, None
        reason: str | None = refusal.reason
    else:
        artifact_key = f"updates/{model.name}/{update_id}.update"
        store.put(artifact_key, body)
        state, status, checked_or_none, reason = UpdateState.PENDING, 202, checked, None
    row, created = repo.insert_update_once(
        session, update_id=update_id, node_id=node.id, model_name=model.name,
        idempotency_key=idempotency_key,
        state=state,
        base_generation=checked_or_none.base_generation if checked_or_none else None,
        continues_key=checked_or_none.continues if checked_or_none else None,
        num_samples=checked_or_none.num_samples if checked_or_none else 0,
        metrics=checked_or_none.metrics if checked_or_none else {},
        encoding=checked_or_none.encoding if checked_or_none else "",
        size_bytes=len(body), l2_norm=checked_or_none.norm if checked_or_none else None,
        clipped=False, artifact_key=artifact_key, reason=reason,
        response_status=status, response={},
    )
    if not created:  # the same key raced in from another request: its answer stands
        if artifact_key is not None:
            store.delete(artifact_key)
        return row.response_status, row.response, True
    response = update_info(row, None)
    if reason is not None:
        response = {"detail": reason, "update_id": row.id}
    row.response = response
    LOGGER.info("update %s from node %s: %s", row.id, node.name,
                "accepted" if reason is None else f"refused: {reason}",
                extra={"update_id": row.id, "node": node.name, "received_at": utcnow()})
    return status, response, False
