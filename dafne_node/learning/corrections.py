"""Corrections: a SEG that comes back from a viewer becomes a training example.

Viewers never reference the node's SEG and their Segment Algorithm Type cannot be trusted
(OHIF writes MANUAL, 3D Slicer keeps what it loaded), so a SEG is recognised by the
*source images* it references: when they belong to an image series the node holds, the
SEG is a correction candidate, compared with the newest SEG the node made for that series:

* the node's own SEG coming back (same SOP Instance UID, e.g. PACS routing every new
  series back) is an echo: logged, not counted;
* the same content as the node's SEG, on the labels it covers, is **confirmed**;
* anything else is stored as a training example (:mod:`dafne_node.learning.examples`)
  and **queued**, with the Dice per label between the node's SEG and the correction and
  the slices that changed; it supersedes any older correction of the same series;
* a SEG whose source images are gone is **unusable**, and one the node cannot read, that
  references images it never received, maps no segment to a label or does not fit the
  source geometry is **rejected**; both with the reason.

Labels the correction does not cover are taken from the node's SEG, which the radiologist
left as it was. One SEG is examined at a time and each outcome is its own transaction, so a
broken SEG never blocks the others in its series.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import NodeConfig
from dafne_node.dicom.seg_decode import (
    DecodedSegmentation,
    SegmentationError,
    SourceFrame,
    decode_segmentation,
    image_position,
    referenced_uids,
)
from dafne_node.dicom.series import ImageVolume, InputError, load_volume, read_series
from dafne_node.jobs import lifecycle
from dafne_node.jobs.runner import ClaimedJob
from dafne_node.learning.examples import ExampleStore
from dafne_node.model.labels import Label
from dafne_node.model.metrics import dice_per_label
from dafne_node.model.train import TrainingExample
from db import corrections as repository
from db.node_models import CorrectionState, Instance, Job, JobKind, JobState, Series

__all__ = ["CorrectionHandler", "CorrectionSummary", "Finding"]

LOGGER = logging.getLogger(__name__)

_LOOKUP_CHUNK = 500
"""SOP Instance UIDs per query when finding the source series (bounded IN lists)."""


class _UnusableError(Exception):
    """The correction refers to images the node no longer has (or cannot read)."""


@dataclass
class Finding:
    """What examining one SEG found: the fields of its ``corrections`` row."""

    state: CorrectionState
    reason: str | None = None
    writer: str | None = None
    source_series_id: int | None = None
    source_series_uid: str | None = None
    labels: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    dice: dict[str, float | None] = field(default_factory=dict)
    changed_slices: list[int] = field(default_factory=list)
    corrects_job_id: int | None = None
    model_name: str | None = None
    model_version: str | None = None
    example_path: str | None = None


@dataclass(frozen=True)
class CorrectionSummary:
    """What a correction job did with the SEG instances of its series."""

    job_id: int
    corrections: tuple[int, ...]
    echoes: int


@dataclass(frozen=True)
class _NodeSeg:
    job_id: int
    path: Path
    model_name: str | None
    model_version: str | None


class CorrectionHandler:
    """Runs correction jobs (the runner's handler for ``correction``).

    Parameters
    ----------
    session_factory:
        Sessions on the node database.
    config:
        Data directory, spool and the label aliases (``corrections.label_aliases``).
    labels:
        The labels of the node's model, from its manifest.
    """

    def __init__(self, session_factory: sessionmaker[Session], config: NodeConfig,
                 labels: Sequence[Label]) -> None:
        self._sessions = session_factory
        self._config = config
        self._labels = tuple(labels)
        self._aliases: Mapping[str, Iterable[str]] = config.corrections.label_aliases
        self._examples = ExampleStore(config.node.data_dir)

    def handle(self, claimed: ClaimedJob) -> CorrectionSummary | None:
        """Examine every SEG instance of the job's series not examined yet."""
        with self._sessions() as session:
            job = session.get(Job, claimed.id)
            if job is None:
                return None
            seg_series_id = job.series_id
            instances = session.execute(
                select(Instance.sop_instance_uid, Instance.spool_path)
                .where(Instance.series_id == seg_series_id).order_by(Instance.id)
            ).all() if seg_series_id is not None else []
        recorded: list[int] = []
        echoes = 0
        for sop_uid, relative in instances:
            with self._sessions() as session:
                if repository.is_node_seg(session, sop_uid):
                    echoes += 1
                    LOGGER.info("SEG %s is the node's own SEG coming back: ignored", sop_uid,
                                extra={"job_id": claimed.id, "sop_instance_uid": sop_uid})
                    continue
                if repository.is_known(session, sop_uid):
                    continue
            finding = self.examine(self._config.spool_dir / relative, seg_series_id)
            correction_id = self._record(claimed, sop_uid, seg_series_id, finding)
            if correction_id is not None:
                recorded.append(correction_id)
        with self._sessions() as session, session.begin():
            job = session.get(Job, claimed.id, with_for_update=True)
            if job is not None and job.state == JobState.RUNNING \
                    and job.claimed_by == claimed.worker_id:
                job.result = {"corrections": recorded, "echoes": echoes}
                lifecycle.finish(job)
        return CorrectionSummary(claimed.id, tuple(recorded), echoes)

    def examine(self, path: Path, seg_series_id: int | None = None) -> Finding:
        """What the SEG in ``path`` is: confirmed, a queued example, unusable or rejected.

        Nothing is written to the database; an example file is written for a queued one.
        """
        try:
            seg = dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            return Finding(CorrectionState.REJECTED, f"not a readable DICOM file: {exc}")
        writer = _writer(seg)
        try:
            finding = self._examine(seg, seg_series_id)
        except SegmentationError as exc:
            finding = Finding(CorrectionState.REJECTED, str(exc))
        except _UnusableError as exc:
            finding = Finding(CorrectionState.UNUSABLE, str(exc))
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
            LOGGER.warning("SEG %s could not be examined", path, exc_info=True)
            finding = Finding(CorrectionState.REJECTED,
                              f"malformed SEG: {type(exc).__name__}: {exc}")
        finding.writer = writer
        return finding

    def _examine(self, seg: Dataset, seg_series_id: int | None) -> Finding:
        if str(seg.get("Modality", "")) != "SEG":
            raise SegmentationError(f"not a segmentation (modality {seg.get('Modality')!r})")
        source = self._source_series(seg, seg_series_id)
        volume, frames = self._source_volume(source)
        finding = Finding(CorrectionState.QUEUED, source_series_id=source.id,
                          source_series_uid=source.series_instance_uid)
        own_frame_of_reference = str(volume.sources[0].get("FrameOfReferenceUID", ""))
        seg_frame_of_reference = str(seg.get("FrameOfReferenceUID", ""))
        if own_frame_of_reference and seg_frame_of_reference \
                and own_frame_of_reference != seg_frame_of_reference:
            raise SegmentationError(
                "the SEG's Frame of Reference is not that of its source series: drawn on "
                "other images")
        corrected = decode_segmentation(seg, self._labels, frames, aliases=self._aliases,
                                        matrix=volume.pixels.shape[1:])
        finding.labels = [label.key for label in corrected.labels]
        finding.unmapped = list(corrected.unmapped)
        node_seg = self._node_seg(source.id)
        node_map = self._node_label_map(node_seg, frames) if node_seg else None
        if node_seg is not None:
            finding.corrects_job_id = node_seg.job_id
            finding.model_name, finding.model_version = node_seg.model_name, node_seg.model_version
        return self._compare(finding, volume, corrected, node_map)

    def _compare(self, finding: Finding, volume: ImageVolume, corrected: DecodedSegmentation,
                 node_map: np.ndarray | None) -> Finding:
        values = [label.value for label in corrected.labels]
        truth = corrected.label_map
        if node_map is None:
            finding.reason = "the node made no SEG of this series: learned from as drawn"
            merged = truth
            changed = np.any(truth > 0, axis=(1, 2))
        else:
            covered = np.where(np.isin(node_map, values), node_map, 0)
            dice = dice_per_label(covered, truth, values)
            finding.dice = {label.key: None if math.isnan(dice[label.value])
                            else round(dice[label.value], 4) for label in corrected.labels}
            changed = np.any(covered != truth, axis=(1, 2))
            if not changed.any():
                finding.state = CorrectionState.CONFIRMED
                finding.reason = "same content as the node's SEG"
                return finding
            merged = np.where(truth > 0, truth, np.where(np.isin(node_map, values), 0, node_map))
        finding.changed_slices = [int(i) for i in np.flatnonzero(changed)]
        finding.example_path = self._examples.save(
            TrainingExample(pixels=volume.pixels, labels=merged.astype(np.uint8),
                            pixel_spacing=volume.pixel_spacing),
            label_values=values, changed_slices=finding.changed_slices,
        )
        return finding

    def _source_series(self, seg: Dataset, seg_series_id: int | None) -> Series:
        series_uids, sop_uids = referenced_uids(seg)
        if not series_uids and not sop_uids:
            raise SegmentationError("the SEG references no source images")
        with self._sessions() as session:
            image_series = (Series.modality != "SEG") | Series.modality.is_(None)
            source = session.scalars(
                select(Series).where(Series.series_instance_uid.in_(series_uids),
                                     Series.id != (seg_series_id or -1), image_series)
                .order_by(Series.id)
            ).first() if series_uids else None
            if source is None and sop_uids:
                source = _series_of_most(session, sorted(sop_uids), seg_series_id)
            if source is None:
                named = sorted(series_uids)[:1] or sorted(sop_uids)[:1]
                raise SegmentationError(
                    f"the SEG references images this node never received (e.g. {named[0]})")
            session.expunge(source)
            return source

    def _source_volume(self, source: Series) -> tuple[ImageVolume, list[SourceFrame]]:
        with self._sessions() as session:
            relatives = list(session.scalars(
                select(Instance.spool_path).where(Instance.series_id == source.id)
                .order_by(Instance.id)))
        paths = [self._config.spool_dir / relative for relative in relatives]
        missing = sum(not path.exists() for path in paths)
        if not paths or missing:
            raise _UnusableError(f"the source images are gone ({missing} of {len(paths)} removed "
                            "from the spool)")
        series, refusals = read_series(paths)
        if refusals or len(series) != 1:
            reasons = "; ".join(str(refusal) for refusal in refusals) or "several series"
            raise _UnusableError(f"the source series cannot be read: {reasons}")
        try:
            volume = load_volume(series[0])
        except InputError as exc:
            raise _UnusableError(f"the source series cannot be read: {exc}") from exc
        return volume, _source_frames(volume)

    def _node_seg(self, source_series_id: int) -> _NodeSeg | None:
        with self._sessions() as session:
            job = session.scalars(
                select(Job).where(Job.kind == JobKind.SEGMENT, Job.series_id == source_series_id,
                                  Job.result_sop_instance_uid.is_not(None),
                                  Job.state.in_([JobState.SENDING, JobState.DONE]))
                .order_by(Job.id.desc()).limit(1)
            ).first()
            if job is None or not job.result or "seg_path" not in job.result:
                return None
            model = job.result.get("model", {})
            version = model.get("version") or (
                f"g{model['generation']}" if "generation" in model else None)
            return _NodeSeg(job.id, Path(job.result["seg_path"]), model.get("name"), version)

    def _node_label_map(self, node_seg: _NodeSeg, frames: list[SourceFrame]
                        ) -> np.ndarray | None:
        try:
            decoded = decode_segmentation(dcmread(node_seg.path), self._labels, frames)
        except (OSError, InvalidDicomError, SegmentationError) as exc:
            LOGGER.warning("the node's SEG %s cannot be read to compare with (%s); the "
                           "correction is learned from as drawn", node_seg.path, exc)
            return None
        return decoded.label_map

    def _record(self, claimed: ClaimedJob, sop_uid: str, seg_series_id: int | None,
                finding: Finding) -> int | None:
        with self._sessions() as session, session.begin():
            correction = repository.record(
                session, job_id=claimed.id, seg_sop_instance_uid=sop_uid,
                seg_series_id=seg_series_id, state=finding.state, reason=finding.reason,
                writer=finding.writer, source_series_id=finding.source_series_id,
                source_series_uid=finding.source_series_uid, labels=finding.labels,
                unmapped=finding.unmapped, dice=finding.dice,
                changed_slices=finding.changed_slices, corrects_job_id=finding.corrects_job_id,
                model_name=finding.model_name, model_version=finding.model_version,
                example_path=finding.example_path,
            )
            if correction is None:  # another worker recorded it first
                if finding.example_path:
                    self._examples.delete(finding.example_path)
                return None
            superseded = repository.supersede_older(session, correction) \
                if finding.state in repository.REPLACEABLE else []
            correction_id = correction.id
        LOGGER.info(
            "SEG %s from %s: correction %d %s%s", sop_uid, finding.writer or "unknown writer",
            correction_id, finding.state.value, f" ({finding.reason})" if finding.reason else "",
            extra={"job_id": claimed.id, "correction_id": correction_id,
                   "state": finding.state.value, "labels": finding.labels,
                   "unmapped": finding.unmapped, "dice": finding.dice,
                   "superseded": [older.id for older in superseded]},
        )
        return correction_id


def _series_of_most(session: Session, sop_uids: list[str], exclude: int | None) -> Series | None:
    """The image series holding the most of ``sop_uids`` (a SEG may reference a subset)."""
    counts: dict[int, int] = {}
    for start in range(0, len(sop_uids), _LOOKUP_CHUNK):
        for series_id, count in session.execute(
            select(Instance.series_id, func.count())
            .where(Instance.sop_instance_uid.in_(sop_uids[start:start + _LOOKUP_CHUNK]))
            .group_by(Instance.series_id)
        ):
            counts[series_id] = counts.get(series_id, 0) + int(count)
    for series_id, _ in sorted(counts.items(), key=lambda item: -item[1]):
        series = session.get(Series, series_id)
        if series is not None and series.id != exclude and series.modality != "SEG":
            return series
    return None


def _source_frames(volume: ImageVolume) -> list[SourceFrame]:
    """The volume's frames with their positions, in the volume's order."""
    if len(volume.sources) == volume.pixels.shape[0]:
        return [SourceFrame(str(ds.SOPInstanceUID), 1, image_position(ds)) for ds in volume.sources]
    multiframe = volume.sources[0]
    return [
        SourceFrame(str(multiframe.SOPInstanceUID), number,
                    image_position(group.PlanePositionSequence[0]))
        for number, group in enumerate(multiframe.PerFrameFunctionalGroupsSequence, start=1)
    ]


def _writer(seg: Dataset) -> str | None:
    parts = [str(seg.get(keyword, "") or "") for keyword in
             ("Manufacturer", "ManufacturerModelName", "SoftwareVersions")]
    text = " ".join(part for part in parts if part).strip()
    return text[:128] or None
