"""Model directories: safetensors weights described by a JSON manifest.

Models are data, never code. A model directory holds exactly two things that matter:

``model.safetensors``
    The weights. safetensors is a flat tensor format with no code path on load; pickle
    files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pkl``) are refused outright, because
    unpickling runs arbitrary code from whoever wrote the file.
``manifest.json``
    What the weights mean: the built-in architecture and its parameters, the labels with
    their SNOMED CT codes, the preprocessing the model was trained with, the generation, and
    the sha256 of the weights file, so that a truncated or substituted file is caught before
    it is loaded. (Signing the manifest is the federation's job, on top of this.)

:func:`load_model_dir` checks all of that and raises :class:`ModelError` with a message
naming what is wrong; :func:`save_model_dir` writes both files into a fresh directory and
swaps it into place, so a reader never sees new weights with an old manifest.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydicom.sr.coding import Code
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dafne_node.durable import fsync_dir
from dafne_node.model.architectures import build_model
from dafne_node.model.labels import LEG_MUSCLES, Label
from dafne_node.model.metrics import json_safe
from dafne_node.model.preprocess import PreprocessConfig

LOGGER = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT_VERSION",
    "WEIGHTS_FILE",
    "ArchitectureSpec",
    "CodeSpec",
    "LabelSpec",
    "LoadedModel",
    "ModelError",
    "ModelManifest",
    "PreprocessingSpec",
    "default_model_dir",
    "file_sha256",
    "load_manifest",
    "load_model_dir",
    "save_model_dir",
]

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FORMAT_VERSION = 1
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class ModelError(ValueError):
    """A model directory is missing, malformed, tampered with or incompatible."""


class CodeSpec(BaseModel):
    """A coded concept (DICOM Code Sequence item): value, scheme and meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str
    scheme: str
    meaning: str


class LabelSpec(BaseModel):
    """One output class of the model and how it is coded in a DICOM-SEG."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: int = Field(ge=1, le=255)
    key: str
    name: str
    category: CodeSpec
    type: CodeSpec

    @classmethod
    def from_label(cls, label: Label) -> LabelSpec:
        """Describe a :class:`dafne_node.model.labels.Label`."""
        def code(c: Any) -> CodeSpec:
            return CodeSpec(value=c.value, scheme=c.scheme_designator, meaning=c.meaning)

        return cls(value=label.value, key=label.key, name=label.name,
                   category=code(label.category_code), type=code(label.type_code))


class ArchitectureSpec(BaseModel):
    """A built-in architecture id and the parameters to build it with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    params: dict[str, int]


class WeightsSpec(BaseModel):
    """The weights file and its sha256 (hex)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = WEIGHTS_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dtype: str = "float32"


class PreprocessingSpec(BaseModel):
    """Preprocessing in the manifest: every field required, so none is silently defaulted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_spacing_mm: float
    input_shape: tuple[int, int]
    percentile_low: float
    percentile_high: float

    @classmethod
    def from_config(cls, config: PreprocessConfig) -> PreprocessingSpec:
        """Describe a :class:`PreprocessConfig`."""
        return cls(**asdict(config))

    def to_config(self) -> PreprocessConfig:
        """The validated :class:`PreprocessConfig` (raises ValueError if inconsistent)."""
        return PreprocessConfig(**self.model_dump())


class ModelManifest(BaseModel):
    """Contents of ``manifest.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int
    name: str
    generation: int = Field(ge=0)
    architecture: ArchitectureSpec
    labels: list[LabelSpec]
    preprocessing: PreprocessingSpec
    weights: WeightsSpec
    created: datetime
    training: dict[str, Any] | None = None
    local_round: int | None = Field(default=None, ge=1)

    def to_labels(self) -> tuple[Label, ...]:
        """The labels the model was trained for, as its manifest writes them.

        Why here: encoding, decoding, comparing and training all name structures by these,
        so a model with other labels needs no second list anywhere in the code.
        """
        def code(spec: CodeSpec) -> Code:
            return Code(spec.value, spec.scheme, spec.meaning)

        return tuple(
            Label(value=spec.value, key=spec.key, name=spec.name, type_code=code(spec.type),
                  category_code=code(spec.category))
            for spec in self.labels
        )

    @property
    def num_classes(self) -> int:
        """Background plus the labels."""
        return len(self.labels) + 1

    @property
    def version_label(self) -> str:
        """``"g1"`` for root generation 1, ``"g1-local3"`` for its third local fine-tuning.

        Why: a SEG names the algorithm version that made it, and a model fine-tuned on this
        node's corrections must not pass for the federation's root generation it started from.
        """
        root = f"g{self.generation}"
        return root if self.local_round is None else f"{root}-local{self.local_round}"


@dataclass
class LoadedModel:
    """A verified model directory: manifest plus a module in eval mode with its weights."""

    path: Path
    manifest: ModelManifest
    model: nn.Module

    @property
    def preprocessing(self) -> PreprocessConfig:
        """Preprocessing the model expects."""
        return self.manifest.preprocessing.to_config()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_model_dir() -> Path:
    """Path of the default leg model bundled in the package (``dafne_node/models/leg-default``).

    The directory may be absent in a source checkout where the model has not been built; the
    caller's :func:`load_model_dir` then reports it.
    """
    return Path(str(importlib.resources.files("dafne_node") / "models" / "leg-default"))


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "missing":
            parts.append(f"missing required key {loc!r}")
        elif err["type"] == "extra_forbidden":
            parts.append(f"unexpected key {loc!r}")
        else:
            parts.append(f"invalid {loc!r}: {err['msg']}")
    return f"manifest {path} is invalid: " + "; ".join(parts)


def load_manifest(model_dir: str | os.PathLike[str]) -> ModelManifest:
    """Read and validate ``manifest.json`` of a model directory (weights not checked).

    Raises
    ------
    ModelError
        If the manifest is missing, not JSON, lacks a key or has an unsupported version.
    """
    path = Path(model_dir) / MANIFEST_FILE
    if not Path(model_dir).is_dir():
        raise ModelError(f"model directory {model_dir} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model directory {model_dir} has no {MANIFEST_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"manifest {path} must be a JSON object")
    version = raw.get("format_version")
    if version is not None and version != MANIFEST_FORMAT_VERSION:
        raise ModelError(
            f"manifest {path} has format_version {version!r}; this node reads version "
            f"{MANIFEST_FORMAT_VERSION}"
        )
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(_format_validation_error(path, exc)) from None
    try:
        manifest.preprocessing.to_config()
    except ValueError as exc:
        raise ModelError(f"manifest {path} has invalid 'preprocessing': {exc}") from None
    return manifest


def load_model_dir(model_dir: str | os.PathLike[str]) -> LoadedModel:
    """Verify a model directory and build its model with the stored weights.

    Checks, in order: the manifest (present, JSON, required keys, version); the architecture
    is built in and its parameters are valid; the labels fit the output channels; the
    weights file is safetensors, not pickle; its sha256 matches the manifest; its tensor
    names and shapes are exactly those of the architecture.

    Raises
    ------
    ModelError
        Naming the first check that failed.
    """
    root = Path(model_dir)
    manifest = load_manifest(root)
    spec = manifest.architecture
    try:
        model = build_model(spec.id, spec.params)
    except ValueError as exc:
        raise ModelError(f"manifest {root / MANIFEST_FILE}: {exc}") from None
    out_channels = model.architecture_params.get("num_classes")
    if out_channels is not None and out_channels != manifest.num_classes:
        raise ModelError(
            f"manifest {root / MANIFEST_FILE} lists {len(manifest.labels)} labels but the "
            f"architecture has {out_channels} output classes (labels + background)"
        )
    multiple = 2 ** int(model.architecture_params.get("depth", 0))
    if any(n % multiple for n in manifest.preprocessing.input_shape):
        raise ModelError(
            f"manifest {root / MANIFEST_FILE}: preprocessing.input_shape "
            f"{tuple(manifest.preprocessing.input_shape)} must be multiples of {multiple} "
            f"for architecture {spec.id!r} with depth {multiple.bit_length() - 1}"
        )
    values = sorted(label.value for label in manifest.labels)
    if values != list(range(1, len(values) + 1)):
        raise ModelError(
            f"manifest {root / MANIFEST_FILE}: label values must be 1..{len(values)}, got {values}"
        )

    weights_name = manifest.weights.file
    if Path(weights_name).name != weights_name:
        raise ModelError(f"manifest {root / MANIFEST_FILE}: weights file must be a plain name")
    weights = root / weights_name
    if weights.suffix.lower() in _PICKLE_SUFFIXES or not weights.name.endswith(".safetensors"):
        raise ModelError(
            f"weights {weights} are not a .safetensors file; pickle-based formats are refused"
        )
    if not weights.is_file():
        pickles = [p.name for p in root.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES]
        hint = f" (found {', '.join(pickles)}: pickle files are refused)" if pickles else ""
        raise ModelError(f"model directory {root} has no weights file {weights_name}{hint}")
    actual = file_sha256(weights)
    if actual != manifest.weights.sha256:
        raise ModelError(
            f"weights of {root} do not match the manifest sha256 "
            f"(expected {manifest.weights.sha256}, got {actual})"
        )
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"weights {weights} are not a readable safetensors file: {exc}") from None

    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelError(
            f"weights {weights} do not fit architecture {spec.id!r}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for name, ref in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise ModelError(
                f"weights {weights}: tensor {name!r} has shape {tuple(got.shape)}, "
                f"architecture {spec.id!r} expects {tuple(ref.shape)}"
            )
        if not got.is_floating_point():
            raise ModelError(f"weights {weights}: tensor {name!r} is not floating point")
        if not torch.isfinite(got).all():
            raise ModelError(f"weights {weights}: tensor {name!r} contains NaN or Inf")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
    model.eval()
    LOGGER.info("loaded model %r generation %d from %s", manifest.name, manifest.generation,
                root)
    return LoadedModel(path=root, manifest=manifest, model=model)




def save_model_dir(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    name: str,
    generation: int,
    preprocessing: PreprocessConfig,
    labels: Iterable[Label] = LEG_MUSCLES,
    training: Mapping[str, Any] | None = None,
    weights_dtype: torch.dtype = torch.float32,
    created: datetime | None = None,
    local_round: int | None = None,
) -> ModelManifest:
    """Write ``model`` as a model directory at ``path``, replacing it atomically.

    The architecture id and parameters are taken from the model (as set by
    :func:`dafne_node.model.architectures.build_model`). Both files are written and fsynced in
    a sibling temporary directory which is then renamed onto ``path``; an existing directory
    is moved aside first and removed after the swap.

    Parameters
    ----------
    model:
        The module to save, built by ``build_model``.
    path:
        The model directory to create or replace.
    name:
        Human-readable model name, e.g. ``"Dafne leg"``.
    generation:
        Model generation (1 for the bundled default; the federation increments it).
    preprocessing:
        Preprocessing the model was trained with.
    labels:
        The labels of output channels 1..K, in order.
    training:
        Optional JSON-able summary of training (metrics, data, duration); NaN becomes null.
    weights_dtype:
        ``torch.float32`` or ``torch.float16`` (halves the file; the loader casts back).
    created:
        Creation time; now (UTC) if not given.
    local_round:
        For a model fine-tuned on this node: the local round (1, 2, ...) on top of root
        ``generation``; ``None`` (default) for a root generation, whose manifest then has no
        ``local_round`` key, exactly as before the key existed.

    Returns
    -------
    ModelManifest
        The manifest written.
    """
    arch_id = getattr(model, "architecture_id", None)
    arch_params = getattr(model, "architecture_params", None)
    if not isinstance(arch_id, str) or not isinstance(arch_params, dict):
        raise ValueError("model was not built by dafne_node.model.architectures.build_model")
    if weights_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"weights_dtype must be float32 or float16, got {weights_dtype}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", weights_dtype).contiguous()
             for k, v in model.state_dict().items()}
    label_specs = [LabelSpec.from_label(label) for label in labels]

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        weights_path = tmp / WEIGHTS_FILE
        save_file(state, str(weights_path), metadata={"format": "pt"})
        with open(weights_path, "rb") as f:
            os.fsync(f.fileno())
        manifest = ModelManifest(
            format_version=MANIFEST_FORMAT_VERSION,
            name=name,
            generation=generation,
            architecture=ArchitectureSpec(id=arch_id, params=arch_params),
            labels=label_specs,
            preprocessing=PreprocessingSpec.from_config(preprocessing),
            weights=WeightsSpec(sha256=file_sha256(weights_path),
                                dtype=str(weights_dtype).removeprefix("torch.")),
            created=created or datetime.now(UTC),
            training=json_safe(dict(training)) if training is not None else None,
            local_round=local_round,
        )
        payload = manifest.model_dump(
            mode="json", exclude={"local_round"} if local_round is None else None)
        manifest_path = tmp / MANIFEST_FILE
        with open(manifest_path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        # mkdtemp makes the directory private and safetensors may write 0600; the model is
        # package data that the node's service user must be able to read.
        os.chmod(weights_path, 0o644)
        os.chmod(manifest_path, 0o644)
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOGGER.info("saved model %r %s to %s", name, manifest.version_label, target)
    return manifest
