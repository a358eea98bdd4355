"""Model generations as artifacts: weights, the signed manifest, and reading them back.

A promoted generation is two artifacts: the weights (safetensors, fp32) and its manifest,
the node's own ``manifest.json`` format with ``generation`` set and the weights' sha256 in
it. The server signs the manifest's exact bytes with its Ed25519 key; since the manifest
holds the weights' sha256, one signature covers both, and a node that checks the signature
and then the sha256 has verified everything before it loads a byte of the model.

Candidates are weights only: they get a number, a manifest and a signature when promoted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dafne_node.model.manifest import ModelManifest, WeightsSpec, load_model_dir
from federation.signing import sign
from federation.storage import ArtifactStore

__all__ = [
    "GenerationArtifacts",
    "StoredWeights",
    "generation_manifest",
    "load_weights",
    "read_seed",
    "store_generation_manifest",
    "store_weights",
    "store_weights_file",
]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredWeights:
    """Where a state dict was stored, and its sha256 and size."""

    key: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class GenerationArtifacts:
    """A promoted generation's manifest key and the signature of its bytes."""

    manifest_key: str
    signature: str


def store_weights(store: ArtifactStore, key: str, state: Mapping[str, torch.Tensor]
                  ) -> StoredWeights:
    """Serialise ``state`` as safetensors (contiguous CPU fp32 copies) and store it at ``key``."""
    return store_weights_file(store, key, save_safetensors(
        {name: tensor.detach().to("cpu", torch.float32).contiguous()
         for name, tensor in state.items()}))


def store_weights_file(store: ArtifactStore, key: str, data: bytes) -> StoredWeights:
    """Store a safetensors weights file's bytes unchanged at ``key``."""
    store.put(key, data)
    return StoredWeights(key=key, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def load_weights(store: ArtifactStore, key: str, sha256: str) -> dict[str, torch.Tensor]:
    """Read a stored state dict and check it against the sha256 recorded for it.

    Raises
    ------
    ValueError
        If the artifact's sha256 differs: storage was tampered with or corrupted, and
        nothing may be built on it.
    """
    data = store.get(key)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ValueError(f"artifact {key} has sha256 {actual[:12]}…, the database records "
                         f"{sha256[:12]}…: refusing to use it")
    return load_safetensors(data)


def generation_manifest(seed: ModelManifest, number: int, weights: StoredWeights,
                        created: datetime | None = None) -> ModelManifest:
    """The manifest of generation ``number``: the seed's, with number, weights and date."""
    return seed.model_copy(update={
        "generation": number,
        "local_round": None,
        "created": created or datetime.now(UTC),
        "weights": WeightsSpec(sha256=weights.sha256, dtype="float32"),
    })


def store_generation_manifest(store: ArtifactStore, key: Ed25519PrivateKey, model_name: str,
                              manifest: ModelManifest) -> GenerationArtifacts:
    """Store the manifest's bytes and sign exactly those bytes."""
    data = manifest.model_dump_json(indent=2).encode("utf-8")
    manifest_key = f"models/{model_name}/generations/{manifest.generation}/manifest.json"
    store.put(manifest_key, data)
    return GenerationArtifacts(manifest_key=manifest_key, signature=sign(key, data))


def read_seed(model_dir: Path) -> tuple[ModelManifest, bytes]:
    """Verify a model directory (manifest, sha256, architecture); its manifest and weights.

    The weights file's bytes are kept as they are, so that generation 1 has the sha256 of
    the model every node already runs, and a node's first delta names it as its base.

    Raises
    ------
    dafne_node.model.manifest.ModelError
        Naming the check that failed.
    """
    loaded = load_model_dir(model_dir)
    return loaded.manifest, (Path(model_dir) / loaded.manifest.weights.file).read_bytes()
