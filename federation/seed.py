"""Seeding a model: generation 1 of a new model in the registry, from a model directory.

The model directory is verified like a node verifies one (manifest, sha256, architecture:
:func:`dafne_node.model.manifest.load_model_dir`), its weights stored as the server's
artifact, and generation 1 promoted with a manifest signed by the server's key, so nodes
verify the seed exactly like every later generation. Its validation scores are computed by
the worker before the first aggregation (they are the gate's first baseline).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session, sessionmaker

from db import federation as repo
from db.fed_models import GenerationState
from federation.registry import (
    StoredWeights,
    generation_manifest,
    read_seed,
    store_generation_manifest,
    store_weights_file,
)
from federation.storage import ArtifactStore

__all__ = ["seed_model"]

LOGGER = logging.getLogger(__name__)


def seed_model(sessions: sessionmaker[Session], store: ArtifactStore,
               signing_key: Ed25519PrivateKey, name: str, model_dir: Path, *,
               strategy: str) -> StoredWeights:
    """Create model ``name`` with generation 1 from ``model_dir``; return its stored weights.

    Raises
    ------
    dafne_node.model.manifest.ModelError
        If the model directory fails verification.
    db.federation.FederationRepoError
        If the model exists already or the name is not a valid model name.
    """
    manifest, weights = read_seed(model_dir)
    with sessions() as session:
        if repo.get_model(session, name) is not None:
            raise repo.FederationRepoError(f"model {name!r} exists already")
    stored = store_weights_file(store, f"models/{name}/generations/1/model.safetensors",
                                weights)
    seed = generation_manifest(manifest, 1, stored)
    artifacts = store_generation_manifest(store, signing_key, name, seed)
    with sessions() as session, session.begin():
        repo.add_model(session, name, seed.model_dump(mode="json"), strategy)
        generation = repo.add_generation(
            session, model_name=name, state=GenerationState.CANDIDATE, number=None,
            parent_number=None, strategy=strategy, weights_key=stored.key,
            sha256=stored.sha256, size_bytes=stored.size_bytes)
        repo.promote(session, generation, number=1, manifest_key=artifacts.manifest_key,
                     signature=artifacts.signature, validation=None,
                     reason=f"seeded from {manifest.name} {manifest.version_label}")
    LOGGER.info("model %s: generation 1 seeded from %s (%s)", name, model_dir,
                stored.sha256[:12])
    return stored
