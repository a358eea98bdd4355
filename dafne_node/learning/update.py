"""The update wire format: a weight delta as a node uploads it to the federation server.

A delta file (:mod:`dafne_node.learning.delta`) is fp16, half the size of the model. Sent
every round by every node that is still too much for hospital uplinks, so the upload is
compressed further, tensor by tensor:

* ``topk-int8`` (the default): keep the ``density`` fraction of entries with the largest
  magnitude, as a bit mask over the row-major flattened tensor (``np.packbits``, little
  bit order) plus the kept values quantised to int8 with one fp32 scale
  (``value = q * scale``, ``scale = max|x| / 127``). What is dropped is not lost: *error
  feedback* keeps it in a
  residual that the node adds to its next delta before selecting, so every change is sent
  eventually and the sum of what the server received tracks the sum of the deltas
  (Stich et al., "Sparsified SGD with memory", 2018). The residual is
  ``(delta + old residual) - decoded(sent)``, which also carries the int8 rounding error.
* ``int8``: every entry, int8 with one fp32 scale; the error is at most ``scale / 2``.
* ``fp16``: every entry in half precision. Tensors with fewer than 4096 entries (biases,
  norms) always travel so; compressing them would save little and their entries matter.

Size, per fp32 parameter of 4 bytes: a mask bit (1/8 byte) plus ``density`` bytes of int8,
so 0.125 + 0.2 = 0.325 bytes at the default density 0.2, about 8 % of the fp32 model (8.7 %
with the small fp16 tensors and the header); ``int8`` is 25 %, ``fp16`` 50 %.

Why 0.2 and not less: a fine-tuning delta is not sparse (its largest 10 % of entries hold
under half of its energy, about as much as in Gaussian noise), so one upload at density 0.1
loses 0.14 of the site-C Dice the uncompressed delta gains, at 0.2 it loses 0.06, and error
feedback recovers the rest over the next uploads (``bench/update_size.py``).

The bytes are one safetensors file (no pickle: an update comes from another machine and
must not be able to run code). Its header's ``__metadata__`` is
``{"format": "dafne-update/1", "metadata": <UpdateMetadata as JSON>}``; the metadata lists
every tensor with its shape and encoding, which fixes exactly which keys, dtypes and
shapes the file must hold (``<name>`` fp16; ``<name>.q`` int8 and ``<name>.scale`` fp32
``[1]``; ``<name>.mask`` uint8, ``<name>.q`` int8 and ``<name>.scale`` fp32 ``[1]``).

The server decodes what anyone sends, so :func:`decode_update` trusts nothing: it bounds
the size, reads the header itself (bounded length, JSON, no duplicate keys) before the
tensors, checks every key, dtype and shape against the metadata, and refuses NaN, Inf and
negative scales, each time with an :class:`UpdateFormatError` that names the tensor or
field, which the server returns as the reason of its 4xx answer.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dafne_node.learning.delta import DeltaMetadata

LOGGER = logging.getLogger(__name__)

__all__ = [
    "MAX_DIMS",
    "MAX_HEADER_BYTES",
    "MAX_NUMEL",
    "SMALL_TENSOR_NUMEL",
    "UPDATE_FORMAT",
    "DecodedUpdate",
    "EncodedUpdate",
    "Encoding",
    "TensorInfo",
    "UpdateFormatError",
    "UpdateMetadata",
    "UpdateTooLargeError",
    "check_matches",
    "decode_update",
    "encode_update",
]

UPDATE_FORMAT = "dafne-update/1"
SMALL_TENSOR_NUMEL = 4096
"""Tensors with fewer entries are always sent as fp16."""
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest safetensors header accepted (the leg model's 83 tensors need about 16 KiB)."""
MAX_DIMS = 8
MAX_NUMEL = 2**40
"""Bounds on one tensor's shape, so that hostile metadata cannot make absurd numbers."""

_INT8_MAX = 127
# Keys a tensor of each encoding occupies in the file, and their dtypes.
_SUFFIXES: dict[str, dict[str, torch.dtype]] = {
    "fp16": {"": torch.float16},
    "int8": {".q": torch.int8, ".scale": torch.float32},
    "topk-int8": {".mask": torch.uint8, ".q": torch.int8, ".scale": torch.float32},
}
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int8: "I8",
                       torch.uint8: "U8"}


class Encoding(StrEnum):
    """How one tensor of an update is stored (see the module docstring)."""

    FP16 = "fp16"
    INT8 = "int8"
    TOPK_INT8 = "topk-int8"


class UpdateFormatError(ValueError):
    """Bytes or tensors that are not a valid update; the message names the tensor or field."""


class UpdateTooLargeError(UpdateFormatError):
    """An update larger than the receiver accepts (an HTTP server answers 413)."""


def _describe(exc: ValidationError) -> str:
    """A pydantic error on one line, field by field: it becomes an HTTP reason."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                     for err in exc.errors()[:5])


class TensorInfo(BaseModel):
    """Shape and encoding of one tensor of an update."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_DIMS)
    encoding: Encoding

    @field_validator("shape")
    @classmethod
    def _bounded(cls, shape: list[int]) -> list[int]:
        if math.prod(shape) > MAX_NUMEL:
            raise ValueError(f"more than {MAX_NUMEL} entries")
        return shape

    @property
    def numel(self) -> int:
        """Number of entries of the (decoded) tensor."""
        return math.prod(self.shape)


class UpdateMetadata(BaseModel):
    """What an update is a delta of, how it was trained, and which tensors it holds.

    Attributes
    ----------
    model_name:
        Name of the model (from its manifest).
    architecture:
        Architecture id of the model.
    base_generation:
        Promoted root generation the delta is against.
    base_sha256:
        sha256 of that generation's weights file.
    num_samples:
        Labelled series the run trained on; the server weights the update by it.
    num_slices:
        Slices in those series.
    metrics:
        Local metrics, e.g. ``dice_before``/``dice_after`` on the local hold-out (JSON).
    continues:
        Idempotency key of this node's earlier upload against the same generation that
        this delta contains (the node trained on from that round's model), or None. The
        server aggregates only what is new (:mod:`federation.lineage`).
    tensors:
        Every tensor of the delta, keyed like the model's ``state_dict``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str
    architecture: str
    base_generation: int = Field(ge=1)
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    num_samples: int = Field(ge=1)
    num_slices: int = Field(ge=0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    continues: str | None = Field(default=None, min_length=1, max_length=128)
    tensors: dict[str, TensorInfo]

    @classmethod
    def from_delta(cls, meta: DeltaMetadata, tensors: dict[str, TensorInfo], *,
                   continues: str | None = None) -> UpdateMetadata:
        """The update metadata of a delta file's metadata and the tensors being sent.

        Raises
        ------
        UpdateFormatError
            If the delta cannot be sent as an update (e.g. generation 0 or no samples).
        """
        try:
            return cls(model_name=meta.model_name, architecture=meta.architecture,
                       base_generation=meta.base_generation, base_sha256=meta.base_sha256,
                       num_samples=meta.num_samples, num_slices=meta.num_slices,
                       metrics=json.loads(meta.model_dump_json(include={"metrics"}))["metrics"],
                       continues=continues, tensors=tensors)
        except ValidationError as exc:
            raise UpdateFormatError(f"delta metadata cannot make an update: "
                                    f"{_describe(exc)}") from None


@dataclass(frozen=True)
class EncodedUpdate:
    """An encoded update and what the node keeps for its next one.

    Attributes
    ----------
    payload:
        The bytes to upload.
    metadata:
        The metadata stored in them.
    residual:
        fp32 error-feedback residual, ``(delta + old residual) - decoded(payload)``, to pass
        as ``residual`` to the next :func:`encode_update`.
    """

    payload: bytes
    metadata: UpdateMetadata
    residual: dict[str, torch.Tensor]


@dataclass(frozen=True)
class DecodedUpdate:
    """A checked update: metadata and dense fp32 tensors keyed like the ``state_dict``."""

    metadata: UpdateMetadata
    tensors: dict[str, torch.Tensor]
    size_bytes: int


def _file_keys(tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[str, torch.dtype]]:
    """Every key the file must hold, with the tensor it belongs to and its dtype."""
    keys: dict[str, tuple[str, torch.dtype]] = {}
    for name, info in tensors.items():
        for suffix, dtype in _SUFFIXES[info.encoding].items():
            key = name + suffix
            if key in keys:
                raise UpdateFormatError(f"tensor names clash: {name!r} and {keys[key][0]!r} "
                                        f"both need the key {key!r}")
            keys[key] = (name, dtype)
    return keys


def _dequantise(q: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    value = float(scale[0])
    if not math.isfinite(value) or value < 0:
        raise UpdateFormatError(f"tensor {name!r}: scale {value} is not a finite "
                                "non-negative number")
    return q.float() * value


def _decode_tensor(name: str, info: TensorInfo,
                   stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense fp32 tensor ``name`` from its stored keys (dtypes already checked)."""
    shape = tuple(info.shape)
    if info.encoding == Encoding.FP16:
        if tuple(stored[name].shape) != shape:
            raise UpdateFormatError(f"tensor {name!r} has shape {tuple(stored[name].shape)}, "
                                    f"the metadata says {shape}")
        dense = stored[name].float()
    else:
        q, scale = stored[f"{name}.q"], stored[f"{name}.scale"]
        if tuple(scale.shape) != (1,):
            raise UpdateFormatError(f"tensor {name!r}: scale has shape {tuple(scale.shape)}, "
                                    "expected (1,)")
        if info.encoding == Encoding.INT8:
            if tuple(q.shape) != shape:
                raise UpdateFormatError(f"tensor {name!r}: q has shape {tuple(q.shape)}, the "
                                        f"metadata says {shape}")
            dense = _dequantise(q, scale, name)
        else:
            dense = _scatter(name, info.numel, stored[f"{name}.mask"], q, scale).reshape(shape)
    if not torch.isfinite(dense).all():
        raise UpdateFormatError(f"tensor {name!r} contains NaN or Inf")
    return dense


def _scatter(name: str, numel: int, mask: torch.Tensor, q: torch.Tensor,
             scale: torch.Tensor) -> torch.Tensor:
    """The flat dense tensor of a ``topk-int8`` tensor's mask and kept values."""
    mask_bytes = (numel + 7) // 8
    if tuple(mask.shape) != (mask_bytes,):
        raise UpdateFormatError(f"tensor {name!r}: mask has shape {tuple(mask.shape)}, "
                                f"expected ({mask_bytes},) for {numel} entries")
    bits = np.unpackbits(mask.numpy(), bitorder="little")
    if bits[numel:].any():
        raise UpdateFormatError(f"tensor {name!r}: mask has bits set past entry {numel}")
    kept = torch.from_numpy(bits[:numel].astype(bool))
    count = int(kept.sum())
    if tuple(q.shape) != (count,):
        raise UpdateFormatError(f"tensor {name!r}: q has shape {tuple(q.shape)}, the mask "
                                f"keeps {count} entries")
    dense = torch.zeros(numel, dtype=torch.float32)
    dense[kept] = _dequantise(q, scale, name)
    return dense


def _quantise(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and the fp32 scale ``max|x| / 127`` (0 for an all-zero tensor)."""
    largest = values.abs().max() if values.numel() else torch.tensor(0.0)
    scale = (largest / _INT8_MAX).reshape(1).to(torch.float32)
    q = (torch.zeros_like(values, dtype=torch.int8) if scale[0] == 0 else
         torch.round(values / scale).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8))
    return q.contiguous(), scale


def _encode_tensor(name: str, values: torch.Tensor, encoding: Encoding,
                   density: float) -> dict[str, torch.Tensor]:
    """The keys of one tensor in the file (``values`` is fp32 and finite)."""
    if encoding == Encoding.FP16:
        half = values.to(torch.float16).contiguous()
        if not torch.isfinite(half).all():
            raise UpdateFormatError(f"tensor {name!r} does not fit fp16 (|value| > 65504)")
        return {name: half}
    if encoding == Encoding.INT8:
        q, scale = _quantise(values)
        return {f"{name}.q": q, f"{name}.scale": scale}
    flat = values.reshape(-1)
    keep = max(1, min(flat.numel(), round(density * flat.numel())))
    chosen = torch.topk(flat.abs(), keep, sorted=False).indices.sort().values
    bits = torch.zeros(flat.numel(), dtype=torch.bool)
    bits[chosen] = True
    mask = torch.from_numpy(np.packbits(bits.numpy(), bitorder="little"))
    q, scale = _quantise(flat[chosen])
    return {f"{name}.mask": mask, f"{name}.q": q, f"{name}.scale": scale}


def encode_update(delta: Mapping[str, torch.Tensor], metadata: DeltaMetadata, *,
                  encoding: Encoding | str = Encoding.TOPK_INT8, density: float = 0.2,
                  residual: Mapping[str, torch.Tensor] | None = None,
                  continues: str | None = None) -> EncodedUpdate:
    """Encode a delta for upload, with error feedback.

    Parameters
    ----------
    delta:
        Per tensor, fine-tuned minus base (e.g. a loaded delta file's fp16 tensors).
    metadata:
        The delta's metadata; its base generation must be >= 1 and it must have samples.
    encoding:
        Encoding of the tensors with at least 4096 entries; smaller ones are always fp16.
    density:
        Fraction of entries ``topk-int8`` keeps per tensor, in (0, 1].
    residual:
        The residual returned by the previous call (same names and shapes), or None for
        the first upload against a model.
    continues:
        Idempotency key of the node's earlier upload that this delta contains, if any
        (:attr:`UpdateMetadata.continues`).

    Returns
    -------
    EncodedUpdate
        The payload, its metadata and the new residual.

    Raises
    ------
    UpdateFormatError
        If a tensor is not floating point, holds NaN/Inf or does not fit fp16, the residual
        does not match the delta, or the metadata cannot make an update.
    ValueError
        If ``encoding`` is unknown or ``density`` is outside (0, 1].
    """
    encoding = Encoding(encoding)
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], not {density}")
    if residual is not None:
        _compare(residual, delta, "residual", "the delta")
    sources: dict[str, torch.Tensor] = {}
    for name, tensor in delta.items():
        if not tensor.is_floating_point():
            raise UpdateFormatError(f"tensor {name!r} is not floating point ({tensor.dtype})")
        values = tensor.detach().float().cpu()
        if residual is not None:
            values = values + residual[name].detach().float().cpu()
        if not torch.isfinite(values).all():
            raise UpdateFormatError(f"tensor {name!r} contains NaN or Inf")
        sources[name] = values
    infos = {name: TensorInfo(shape=list(values.shape), encoding=(
        encoding if values.numel() >= SMALL_TENSOR_NUMEL else Encoding.FP16))
        for name, values in sources.items()}
    update_metadata = UpdateMetadata.from_delta(metadata, infos, continues=continues)
    _file_keys(infos)  # refuse names whose keys clash before writing
    stored: dict[str, torch.Tensor] = {}
    new_residual: dict[str, torch.Tensor] = {}
    for name, values in sources.items():
        keys = _encode_tensor(name, values, infos[name].encoding, density)
        stored.update(keys)
        new_residual[name] = values - _decode_tensor(name, infos[name], keys)
    payload = save_safetensors(stored, metadata={
        "format": UPDATE_FORMAT, "metadata": update_metadata.model_dump_json()})
    LOGGER.info("encoded update against generation %d: %d tensors, %s, %d bytes",
                metadata.base_generation, len(infos), encoding, len(payload))
    return EncodedUpdate(payload=payload, metadata=update_metadata, residual=new_residual)


def _refuse_constant(token: str) -> float:
    raise UpdateFormatError(f"{token} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UpdateFormatError(f"number {text[:20]} is out of range")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise UpdateFormatError("duplicate keys in a JSON object")
    return result


def _strict_json(text: str, what: str) -> Any:
    """Parse JSON refusing NaN, Infinity, overflowing numbers and duplicate keys."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_object)
    except UpdateFormatError as exc:
        raise UpdateFormatError(f"{what} is not valid: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits, nesting
        raise UpdateFormatError(f"{what} is not valid JSON: {exc}") from None


def _read_header(payload: bytes) -> tuple[UpdateMetadata, dict[str, Any]]:
    """The metadata and tensor entries of the safetensors header, read before the tensors."""
    if len(payload) < 8:
        raise UpdateFormatError(f"update is not safetensors: {len(payload)} bytes")
    (header_size,) = struct.unpack("<Q", payload[:8])
    if header_size > len(payload) - 8 or header_size > MAX_HEADER_BYTES:
        raise UpdateFormatError(f"update is not safetensors: header length {header_size} "
                                f"in {len(payload)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        text = payload[8:8 + header_size].decode("utf-8")
    except UnicodeDecodeError:
        raise UpdateFormatError("update header is not UTF-8") from None
    header = _strict_json(text, "update header")
    if not isinstance(header, dict):
        raise UpdateFormatError("update header is not a JSON object")
    extra = header.pop("__metadata__", None)
    if not isinstance(extra, dict) or extra.get("format") != UPDATE_FORMAT:
        found = extra.get("format") if isinstance(extra, dict) else None
        raise UpdateFormatError(f"not an update: format {found!r}, expected {UPDATE_FORMAT!r}")
    document = extra.get("metadata")
    if not isinstance(document, str):
        raise UpdateFormatError("update has no metadata")
    try:
        metadata = UpdateMetadata.model_validate(_strict_json(document, "update metadata"))
    except ValidationError as exc:
        raise UpdateFormatError(f"update has invalid metadata: {_describe(exc)}") from None
    return metadata, header


def _check_entries(entries: Mapping[str, Any],
                   expected: Mapping[str, tuple[str, torch.dtype]]) -> None:
    """Refuse unless the header holds exactly the expected keys with the expected dtypes."""
    missing = sorted(set(expected) - set(entries))
    extra = sorted(set(entries) - set(expected))
    if missing or extra:
        raise UpdateFormatError(f"update tensors do not match its metadata: missing "
                                f"{missing[:5]}, unexpected {extra[:5]}")
    for key, (name, dtype) in expected.items():
        entry = entries[key]
        found = entry.get("dtype") if isinstance(entry, dict) else None
        if found != _SAFETENSORS_DTYPES[dtype]:
            raise UpdateFormatError(f"tensor {name!r}: key {key!r} has dtype {found!r}, "
                                    f"expected {_SAFETENSORS_DTYPES[dtype]}")


def decode_update(payload: bytes, *, max_bytes: int | None = None) -> DecodedUpdate:
    """Check and decode uploaded bytes into dense fp32 tensors.

    Parameters
    ----------
    payload:
        The bytes as received (untrusted).
    max_bytes:
        Refuse larger payloads before reading anything (None: no limit).

    Returns
    -------
    DecodedUpdate
        The metadata and the dense fp32 tensors, all finite, of the shapes in the metadata.

    Raises
    ------
    UpdateTooLargeError
        If the payload is larger than ``max_bytes``.
    UpdateFormatError
        Naming what is wrong: not safetensors, wrong format, invalid metadata, keys,
        dtypes or shapes that do not match the metadata, a bad scale, NaN or Inf.
    """
    if max_bytes is not None and len(payload) > max_bytes:
        raise UpdateTooLargeError(f"update is {len(payload)} bytes, at most {max_bytes} "
                                  "are accepted")
    metadata, entries = _read_header(payload)
    expected = _file_keys(metadata.tensors)
    _check_entries(entries, expected)
    try:
        stored = load_safetensors(bytes(payload))
    except (SafetensorError, ValueError) as exc:
        raise UpdateFormatError(f"update is not readable safetensors: {exc}") from None
    tensors = {name: _decode_tensor(name, info, stored)
               for name, info in metadata.tensors.items()}
    return DecodedUpdate(metadata=metadata, tensors=tensors, size_bytes=len(payload))


def _compare(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
             what: str, against: str) -> None:
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    if missing or extra:
        raise UpdateFormatError(f"{what} does not match {against}: missing {missing[:5]}, "
                                f"unexpected {extra[:5]}")
    for name, ref in reference.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise UpdateFormatError(f"{what}: tensor {name!r} has shape "
                                    f"{tuple(tensors[name].shape)}, {against} has "
                                    f"{tuple(ref.shape)}")


def check_matches(tensors: Mapping[str, torch.Tensor],
                  reference: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors that are not exactly those of ``reference``, name for name and shape.

    The server calls it with the base generation's weights before aggregating an update.

    Raises
    ------
    UpdateFormatError
        Naming missing and unexpected tensors, or the first tensor of another shape.
    """
    _compare(tensors, reference, "update", "the model")
