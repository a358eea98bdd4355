"""Which model generation the node uses, as recorded in its database.

The ``models`` table says which generation is active, so that ``status``, the
admin API and every worker process agree, and a generation pulled from the
federation later becomes active with one row change.
"""

from __future__ import annotations

import logging
import re

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dafne_node.config import NodeConfig
from db.base import dialect_insert, utcnow
from db.node_models import Model

LOGGER = logging.getLogger(__name__)

FEDERATION_SOURCE = "federation"
"""``models.source`` of a root generation pulled from the federation server."""


def register_active_model(
    session: Session, *, name: str, generation: int, path: str, sha256: str, source: str,
    manifest: dict[str, object] | None = None, local_round: int = 0, activate: bool = True,
) -> Model:
    """Record a verified model directory and (by default) make it the active model of ``name``.

    Safe when several node processes start at once: the row is inserted with
    ``ON CONFLICT DO NOTHING`` and the switch of the active flag locks the rows it changes.
    """
    session.execute(
        dialect_insert(session, Model)
        .values(name=name, generation=generation, local_round=local_round, path=path,
                sha256=sha256, source=source, manifest=manifest, active=False,
                created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["name", "generation", "local_round"])
    )
    row = session.scalars(
        select(Model).where(Model.name == name, Model.generation == generation,
                            Model.local_round == local_round)
        .with_for_update()
    ).one()
    if row.sha256 != sha256:
        LOGGER.warning("model %s %s changed on disk (%s -> %s)", name,
                       version_label(generation, local_round), row.sha256[:12], sha256[:12])
        row.sha256, row.path, row.manifest = sha256, path, manifest
    if activate and not row.active:
        session.execute(
            update(Model).where(Model.name == name, Model.active, Model.id != row.id)
            .values(active=False).execution_options(synchronize_session=False)
        )
        session.flush()
        row.active = True
        row.activated_at = utcnow()
    session.flush()
    return row


def model_dir_name(name: str, generation: int, local_round: int = 0) -> str:
    """The folder of a model under ``data_dir/models``: ``dafne-leg-g2``, ``dafne-leg-g2-local1``.

    One rule for the trainer's local models and the generations pulled from the federation,
    so that a root generation and the local rounds on top of it sort together.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"
    return f"{slug}-{version_label(generation, local_round)}"


def version_label(generation: int, local_round: int) -> str:
    """``g1`` for a root generation, ``g1-local2`` for a model fine-tuned on this node."""
    return f"g{generation}" if not local_round else f"g{generation}-local{local_round}"


def active_model(session: Session, name: str | None = None) -> Model | None:
    """The active model row (of ``name``, if given), or None."""
    query = select(Model).where(Model.active).order_by(Model.activated_at.desc())
    if name is not None:
        query = query.where(Model.name == name)
    return session.scalars(query).first()


def active_model_info(session: Session, config: NodeConfig) -> tuple[str, int]:
    """Name and generation of the active model, from the database or else the model on disk."""
    row = active_model(session)
    if row is not None:
        return row.name, row.generation
    from dafne_node.model.manifest import default_model_dir, load_manifest  # noqa: PLC0415 - torch

    manifest = load_manifest(config.model.dir or default_model_dir())
    return manifest.name, manifest.generation
