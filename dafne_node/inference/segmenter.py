"""Segment one image series with a model and encode the result as DICOM-SEG.

The one place where a series becomes a SEG: the ``segment`` command and the
node's segmentation jobs both call :class:`SeriesSegmenter`, so a SEG made from
a folder on a laptop and one made from a study pushed by PACS are the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import highdicom as hd
import numpy as np
from pydicom.uid import generate_uid

from dafne_node.dicom.seg_encode import SegmentationAlgorithm, encode_segmentation
from dafne_node.dicom.series import ImageVolume, InputError, SeriesFiles, load_volume
from dafne_node.model.infer import Precision, Segmenter
from dafne_node.model.labels import Label
from dafne_node.model.manifest import LoadedModel, ModelManifest, default_model_dir, load_model_dir

LOGGER = logging.getLogger(__name__)

MODEL_MODALITY = "MR"
"""Dafne's leg models read MR images; other modalities are refused, not guessed at."""


@dataclass(frozen=True)
class StructureVolume:
    """Volume of one segmented structure, what Dafne's users measure."""

    label: Label
    voxels: int
    millilitres: float


@dataclass(frozen=True)
class SegmentationResult:
    """A SEG with what a user wants to know about how it was made."""

    seg: hd.seg.Segmentation
    label_map: np.ndarray
    volume: ImageVolume
    structures: tuple[StructureVolume, ...]
    model_name: str
    generation: int
    model_version: str
    """``g1`` for a root generation, ``g1-local2`` for a model fine-tuned on this node."""
    precision: str
    timings: dict[str, float] = field(default_factory=dict)


def seg_uids(source_series_uid: str, manifest: ModelManifest, revision: int = 0
             ) -> tuple[str, str]:
    """Series and SOP Instance UIDs of the SEG for a source series and model.

    Derived, not random: segmenting the same series with the same model
    generation again yields the same instance, so PACS stores it once. A new
    revision of the source series (late instances) gets a new instance in the
    *same* SEG series, so PACS shows one SEG series whose newest instance
    supersedes the older ones instead of a second, competing series.
    """
    series_sources = [source_series_uid, manifest.name, str(manifest.generation)]
    if manifest.local_round is not None:  # a local model's SEGs are a series of their own
        series_sources.append(f"local-{manifest.local_round}")
    return (
        generate_uid(entropy_srcs=[*series_sources, "series"]),
        generate_uid(entropy_srcs=[*series_sources, f"revision-{revision}", "instance"]),
    )


class ModelSource(Protocol):
    """Where a segment job gets its model: a fixed one, or the node's active model."""

    def current(self) -> SeriesSegmenter:
        """The model to segment the next series with."""
        ...


class SeriesSegmenter:
    """A loaded model that turns image series into SEGs.

    Parameters
    ----------
    model_dir:
        A model directory (manifest + safetensors); the bundled default model
        when None. Verified on load (hash, manifest, tensor shapes).
    precision:
        ``auto`` uses bf16 where the CPU supports it, else fp32.
    """

    def __init__(self, model_dir: Path | None = None, *, precision: Precision = "auto") -> None:
        loaded: LoadedModel = load_model_dir(model_dir or default_model_dir())
        self.manifest = loaded.manifest
        self.labels = loaded.manifest.to_labels()
        self.segmenter = Segmenter.from_loaded(loaded, precision=precision)
        self.model_dir = loaded.path
        self.algorithm = SegmentationAlgorithm(
            name=loaded.manifest.name, version=loaded.manifest.version_label
        )

    @property
    def precision(self) -> str:
        """The arithmetic actually used, ``bf16`` or ``fp32``."""
        return self.segmenter.precision

    def current(self) -> SeriesSegmenter:
        """A loaded model is its own :class:`ModelSource`: it never changes."""
        return self

    def segment_series(
        self, series: SeriesFiles, *, revision: int = 0, series_number: int = 900
    ) -> SegmentationResult:
        """Decode, segment and encode ``series``.

        Raises
        ------
        InputError
            If an image cannot be decoded, the geometry is inconsistent, or the
            model finds none of its structures.
        """
        started = time.perf_counter()
        volume = load_volume(series)
        loaded_at = time.perf_counter()
        label_map = self.segmenter.segment(volume.pixels, volume.pixel_spacing)
        segmented_at = time.perf_counter()
        structures = self._measure(label_map, volume)
        if not structures:
            raise InputError(
                f"{series.paths[0]}: the model found none of its structures in "
                f"{series.description}; is this a lower-leg MR series?"
            )
        series_uid, sop_uid = seg_uids(series.series_instance_uid, self.manifest, revision)
        seg = encode_segmentation(
            label_map,
            volume.sources,
            self.labels,
            self.algorithm,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=series_number,
            instance_number=revision + 1,
        )
        encoded_at = time.perf_counter()
        return SegmentationResult(
            seg=seg,
            label_map=label_map,
            volume=volume,
            structures=structures,
            model_name=self.manifest.name,
            generation=self.manifest.generation,
            model_version=self.manifest.version_label,
            precision=self.precision,
            timings={
                "read": loaded_at - started,
                "segment": segmented_at - loaded_at,
                "encode": encoded_at - segmented_at,
            },
        )

    def _measure(self, label_map: np.ndarray, volume: ImageVolume) -> tuple[StructureVolume, ...]:
        counts = np.bincount(label_map.ravel(), minlength=len(self.labels) + 1)
        return tuple(
            StructureVolume(label, int(counts[label.value]),
                            float(counts[label.value]) * volume.voxel_volume_ml)
            for label in self.labels
            if counts[label.value] > 0
        )


def structure_table(structures: Sequence[StructureVolume]) -> list[str]:
    """Lines of a small table: structure name and volume in mL."""
    width = max((len(s.label.name) for s in structures), default=0)
    return [f"{s.label.name:<{width}}  {s.millilitres:8.1f} mL" for s in structures]
