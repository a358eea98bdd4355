"""Weight deltas: what a node sends to the federation instead of data.

After an accepted fine-tuning run the node shares only how its weights moved: per tensor,
fine-tuned minus base, where the base is the federation's root generation the run started
from. The server weights and averages such deltas (FedBuff) and adds the result to that
root, so a delta is always tied to its base by generation and by the sha256 of the base's
weights file.

Format and why:

* safetensors, fp16. Half precision halves the upload with no loss that matters: fp16
  keeps 11 significant bits, so ``base + delta`` reproduces the fine-tuned weights to about
  5e-4 of each tensor element's change, far below what a further training step changes.
  (Compression is the sync client's business; safetensors is the payload it compresses.)
* The metadata (base generation and sha256, number of training samples, local metrics) is
  JSON in the safetensors header, so one file holds everything and is written atomically.
  No pickle: a delta arrives from other machines and must not be able to run code.
* NaN or Inf anywhere, an fp16 overflow, or a tensor missing, extra or of another shape is
  refused with an error naming the tensor, when computing, loading and applying alike: a
  bad delta must never reach a model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open

from dafne_node.model.checkpoint import save_safetensors_atomically

LOGGER = logging.getLogger(__name__)

__all__ = [
    "DELTA_DTYPE",
    "DeltaError",
    "DeltaMetadata",
    "WeightDelta",
    "apply_delta",
    "compute_delta",
    "load_delta",
    "read_delta_metadata",
    "save_delta",
]

DELTA_DTYPE = torch.float16
_FORMAT = "dafne-weight-delta/1"


class DeltaError(ValueError):
    """A delta that cannot be computed, read or applied; the message names the tensor."""


class DeltaMetadata(BaseModel):
    """What a delta is a delta of, and what it was trained on (no patient data).

    Attributes
    ----------
    model_name:
        Name of the model (from its manifest).
    architecture:
        Architecture id of the model.
    base_generation:
        Root generation the delta is against.
    base_sha256:
        sha256 of the base generation's weights file, so that the server applies the delta
        to exactly those weights.
    local_round:
        Local round of the fine-tuned model this delta describes.
    continues_round:
        Local round of the model the run fine-tuned, when that was itself a local model
        against the same base generation: this delta then contains that round's delta.
        None when the run started from the base generation.
    num_samples:
        Labelled series the run trained on (new and replayed); the server weights by it.
    num_slices:
        Slices in those series.
    metrics:
        Local metrics, e.g. held-out Dice before and after (JSON, NaN as null).
    created:
        When the delta was computed (UTC).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str
    architecture: str
    base_generation: int = Field(ge=0)
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    local_round: int | None = Field(default=None, ge=1)
    continues_round: int | None = Field(default=None, ge=1)
    num_samples: int = Field(ge=0)
    num_slices: int = Field(ge=0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class WeightDelta:
    """A loaded delta: fp16 tensors keyed like the model's ``state_dict``, and its metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: DeltaMetadata


def _check_names_and_shapes(reference: Mapping[str, torch.Tensor],
                            other: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse ``other`` unless it has exactly the tensors of ``reference``, shape for shape."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise DeltaError(f"{what} does not match the base weights: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, ref in reference.items():
        if tuple(other[name].shape) != tuple(ref.shape):
            raise DeltaError(f"{what}: tensor {name!r} has shape {tuple(other[name].shape)}, "
                             f"the base has {tuple(ref.shape)}")


def _check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise DeltaError(f"{what}: tensor {name!r} is not floating point ({tensor.dtype})")
        if not torch.isfinite(tensor).all():
            raise DeltaError(f"{what}: tensor {name!r} contains NaN or Inf")


def compute_delta(base_state: Mapping[str, torch.Tensor],
                  tuned_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per tensor, fine-tuned minus base, in fp16.

    Parameters
    ----------
    base_state:
        ``state_dict`` of the base generation.
    tuned_state:
        ``state_dict`` of the fine-tuned model (same architecture).

    Returns
    -------
    dict[str, torch.Tensor]
        Contiguous fp16 CPU tensors keyed like the state dicts.

    Raises
    ------
    DeltaError
        If the tensors differ in names or shapes, either state holds NaN/Inf, or a
        difference does not fit fp16.
    """
    _check_names_and_shapes(base_state, tuned_state, "fine-tuned weights")
    _check_finite(base_state, "base weights")
    _check_finite(tuned_state, "fine-tuned weights")
    delta = {name: (tuned_state[name].detach().float().cpu()
                    - base.detach().float().cpu()).to(DELTA_DTYPE).contiguous()
             for name, base in base_state.items()}
    _check_finite(delta, "delta (fp16 overflow)")
    return delta


def apply_delta(base_state: Mapping[str, torch.Tensor],
                delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base weights plus a delta, in the base's dtypes: the fine-tuned weights again.

    Parameters
    ----------
    base_state:
        ``state_dict`` of the generation the delta is against.
    delta:
        The delta's tensors (e.g. :attr:`WeightDelta.tensors`).

    Returns
    -------
    dict[str, torch.Tensor]
        A new state dict (the inputs are not modified), ready for ``load_state_dict``.

    Raises
    ------
    DeltaError
        If the delta's tensors differ from the base's in names or shapes, or either holds
        NaN/Inf.
    """
    _check_names_and_shapes(base_state, delta, "delta")
    _check_finite(base_state, "base weights")
    _check_finite(delta, "delta")
    return {name: (base.detach().float() + delta[name].detach().to(base.device).float())
            .to(base.dtype) for name, base in base_state.items()}


def save_delta(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
               metadata: DeltaMetadata) -> Path:
    """Write a delta and its metadata as one safetensors file, atomically.

    Raises
    ------
    DeltaError
        If a tensor is not fp16 or holds NaN/Inf.
    """
    _check_finite(tensors, "delta")
    wrong = sorted(name for name, t in tensors.items() if t.dtype != DELTA_DTYPE)
    if wrong:
        raise DeltaError(f"delta tensors must be {DELTA_DTYPE}, not so: {wrong[:5]}")
    target = save_safetensors_atomically(
        path, dict(tensors),
        {"format": _FORMAT, "metadata": metadata.model_dump_json()})
    LOGGER.info("saved weight delta against generation %d (%d tensors) to %s",
                metadata.base_generation, len(tensors), target)
    return target


def _parse_metadata(path: Path, header: Mapping[str, str]) -> DeltaMetadata:
    if header.get("format") != _FORMAT:
        raise DeltaError(f"{path} is not a weight delta (format {header.get('format')!r}, "
                         f"expected {_FORMAT!r})")
    try:
        return DeltaMetadata.model_validate(json.loads(header["metadata"]))
    except (KeyError, json.JSONDecodeError, ValidationError) as exc:
        raise DeltaError(f"weight delta {path} has invalid metadata: {exc}") from None


def read_delta_metadata(path: str | os.PathLike[str]) -> DeltaMetadata:
    """The metadata of a delta file, without reading its tensors.

    Raises
    ------
    DeltaError
        If the file is not a readable delta.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeltaError(f"weight delta {path} is not a readable safetensors file: {exc}"
                         ) from None
    return _parse_metadata(Path(path), header)


def load_delta(path: str | os.PathLike[str]) -> WeightDelta:
    """Read and check a delta file: fp16, finite, with valid metadata.

    Raises
    ------
    DeltaError
        Naming what is wrong (format, metadata, dtype, NaN/Inf and which tensor).
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeltaError(f"weight delta {path} is not a readable safetensors file: {exc}"
                         ) from None
    metadata = _parse_metadata(Path(path), header)
    wrong = sorted(name for name, t in tensors.items() if t.dtype != DELTA_DTYPE)
    if wrong:
        raise DeltaError(f"weight delta {path}: tensors must be {DELTA_DTYPE}, not so: "
                         f"{wrong[:5]}")
    _check_finite(tensors, f"weight delta {path}")
    return WeightDelta(tensors=tensors, metadata=metadata)
