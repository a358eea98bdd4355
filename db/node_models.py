"""The node's schema: what was received, what is to be done, what is to be sent, which model.

The loop of the design maps onto these tables::

    C-STORE -> instances -> series (quiet period: state receiving -> complete)
            -> jobs (kind segment: queued -> running -> sending -> done | failed | skipped)
            -> outbox (one row per file and destination: pending -> sending -> sent | failed)
    corrections, training and federation sync are further job kinds; models records the
    generations on disk and which one is active.
    SEG from a viewer -> jobs (kind correction) -> corrections (one row per SEG instance:
            confirmed | queued -> trained | superseded, or unusable | rejected with a reason)
    accepted training run -> federation_uploads (one row per weight delta: pending -> sent
            | refused); federation_sync keeps the sync client's state per federation model

States and kinds are stored as short strings (no database enum or CHECK), so adding a job
kind or state later needs no migration; the Python enums below are the vocabulary.
Every time column is a timezone-aware UTC datetime (:class:`db.base.UTCDateTime`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from db.base import JSONType, UTCDateTime, new_metadata, str_enum, utcnow

__all__ = [
    "CORRECTION_TRANSITIONS",
    "JOB_TRANSITIONS",
    "Correction",
    "CorrectionState",
    "FederationSync",
    "FederationUpload",
    "Instance",
    "Job",
    "JobKind",
    "JobState",
    "Model",
    "NodeBase",
    "NodeState",
    "OutboxItem",
    "OutboxState",
    "Series",
    "SeriesState",
    "Study",
    "UploadState",
]

UID = String(64)  # DICOM UI: at most 64 characters
AE = String(16)  # DICOM AE title


class SeriesState(StrEnum):
    """Where a series is in assembly."""

    RECEIVING = "receiving"
    """Instances are arriving (or may still arrive): wait for the quiet period."""
    COMPLETE = "complete"
    """Quiet for long enough; handed to routing (a job was created or it was skipped)."""
    SKIPPED = "skipped"
    """No routing rule matched, or it is not an image series; see ``state_reason``."""


class JobKind(StrEnum):
    """What a job does."""

    SEGMENT = "segment"
    CORRECTION = "correction"
    TRAIN = "train"
    SYNC = "sync"


class JobState(StrEnum):
    """A job's life cycle; ``done``, ``failed`` and ``skipped`` are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.SKIPPED}),
    JobState.RUNNING: frozenset(
        {JobState.SENDING, JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.QUEUED}
    ),
    JobState.SENDING: frozenset({JobState.DONE, JobState.FAILED, JobState.SKIPPED}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.SENDING}),
    JobState.DONE: frozenset(),
    JobState.SKIPPED: frozenset(),
}
"""The one table of a job's allowed state changes, for every kind of job.

``queued → running`` is a claim and ``running → queued`` a retry after an unexpected error
or the take-over of a dead worker's job (``db.jobs``); every other change goes through
``dafne_node.jobs.lifecycle``. ``failed`` is left only by an operator's retry; ``done`` and
``skipped`` are final. A job superseded by a newer revision of its series is ``skipped``
from ``queued`` (waiting for a retry), ``running`` or ``sending``.
"""


class OutboxState(StrEnum):
    """Delivery state of one file to one destination."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"
    """Not sent because a newer SEG of the same series replaced it."""


class NodeBase(DeclarativeBase):
    """Declarative base of the node schema (Alembic history ``db/migrations/node``)."""

    metadata = new_metadata()
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
    }


class _Timestamps:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Study(_Timestamps, NodeBase):
    """A study with at least one received instance."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_description: Mapped[str | None] = mapped_column(Text)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(_Timestamps, NodeBase):
    """A series as received; the unit of assembly, routing and segmentation.

    ``revision`` counts how often the series was reopened: an instance arriving after the
    series was complete sets it back to ``receiving`` and increments ``revision``, so the
    assembler creates a new job (for the new revision) that supersedes the old one.
    """

    __tablename__ = "series"
    __table_args__ = (Index("ix_series_state_last_received_at", "state", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(Text)
    series_number: Mapped[int | None] = mapped_column(Integer)
    image_type: Mapped[str | None] = mapped_column(String(128))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    peer_address: Mapped[str | None] = mapped_column(String(64))

    state: Mapped[SeriesState] = mapped_column(
        str_enum(SeriesState), default=SeriesState.RECEIVING
    )
    state_reason: Mapped[str | None] = mapped_column(Text)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    num_frames: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()
    files_removed_at: Mapped[datetime | None] = mapped_column()
    """When retention removed the series' spool files (the rows stay, for the record)."""

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(NodeBase):
    """One received SOP instance, stored once in the spool (unique SOP Instance UID)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    image_type: Mapped[str | None] = mapped_column(String(128))
    spool_path: Mapped[str] = mapped_column(Text)
    """Relative to the node's spool directory, with ``/`` separators."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_crc32: Mapped[int | None] = mapped_column(BigInteger)
    """CRC-32 of the spooled file as received; tells a complete file after a crash."""
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    called_ae: Mapped[str | None] = mapped_column(AE)
    peer_address: Mapped[str | None] = mapped_column(String(64))

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(_Timestamps, NodeBase):
    """A unit of work with a state; workers claim queued jobs (``db.jobs.claim_next_job``).

    ``(kind, series_id, series_revision)`` is unique, so creating the job for a series
    revision twice (e.g. by an assembler restarted after a crash) is a no-op. A job for a
    newer revision names the one it replaces in ``supersedes_id``.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("kind", "series_id", "series_revision"),
        Index("ix_jobs_claim", "state", "kind", "priority", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[JobKind] = mapped_column(str_enum(JobKind))
    state: Mapped[JobState] = mapped_column(str_enum(JobState), default=JobState.QUEUED)
    series_id: Mapped[int | None] = mapped_column(
        ForeignKey("series.id", ondelete="SET NULL"), index=True
    )
    series_revision: Mapped[int | None] = mapped_column(Integer)
    model_name: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None] = mapped_column()
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column()
    result_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))

    series: Mapped[Series | None] = relationship()
    outbox: Mapped[list[OutboxItem]] = relationship(back_populates="job")


class OutboxItem(_Timestamps, NodeBase):
    """One file to deliver to one destination, retried with back-off until sent or failed.

    Unique per (SOP Instance UID, destination), so enqueueing a resend is idempotent.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "ae_title", "host", "port"),
        Index("ix_outbox_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    destination: Mapped[str | None] = mapped_column(String(64))
    """The configured destination's name, if it came from one."""
    ae_title: Mapped[str] = mapped_column(AE)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    state: Mapped[OutboxState] = mapped_column(str_enum(OutboxState), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    """The DIMSE status of the last attempt, if one was received."""
    sent_at: Mapped[datetime | None] = mapped_column()

    job: Mapped[Job | None] = relationship(back_populates="outbox")


class Model(NodeBase):
    """A model on disk; at most one active model per model name.

    ``local_round`` is 0 for a root generation (bundled or from the federation) and 1, 2, …
    for the models this node fine-tuned from it on its own corrections.
    """

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("name", "generation", "local_round"),
        Index(
            "uq_models_active_name",
            "name",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer)
    local_round: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    source: Mapped[str | None] = mapped_column(String(32))
    """Where it came from: ``bundled``, ``federation`` or ``local``."""
    manifest: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column()


class CorrectionState(StrEnum):
    """What became of a SEG that a viewer sent back."""

    CONFIRMED = "confirmed"
    """Same content as the node's SEG: the radiologist accepted it; nothing to learn."""
    QUEUED = "queued"
    """A training example waits for a training window."""
    TRAINED = "trained"
    """A training run that was accepted learned from it (kept for replay)."""
    SUPERSEDED = "superseded"
    """A newer correction of the same series replaced it; never trained on again."""
    UNUSABLE = "unusable"
    """A correction whose source images are gone (see ``reason``)."""
    REJECTED = "rejected"
    """Not a correction the node can use: unreadable, unknown images, no mappable segment,
    frames off the source geometry (see ``reason``)."""


CORRECTION_TRANSITIONS: dict[CorrectionState, frozenset[CorrectionState]] = {
    CorrectionState.QUEUED: frozenset({CorrectionState.TRAINED, CorrectionState.SUPERSEDED,
                                       CorrectionState.UNUSABLE}),
    CorrectionState.TRAINED: frozenset({CorrectionState.SUPERSEDED}),
    CorrectionState.CONFIRMED: frozenset({CorrectionState.SUPERSEDED}),
    CorrectionState.SUPERSEDED: frozenset(),
    CorrectionState.UNUSABLE: frozenset(),
    CorrectionState.REJECTED: frozenset(),
}
"""A correction's allowed state changes after it was recorded."""


class Correction(_Timestamps, NodeBase):
    """One SEG instance a viewer sent back, and what the node made of it.

    The training example itself (image volume, corrected label map, no DICOM header) is a
    file under the data directory named by ``example_path``; this row keeps the local
    identifiers (UIDs) that the example must not carry.
    """

    __tablename__ = "corrections"
    __table_args__ = (Index("ix_corrections_state", "state", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    seg_sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    seg_series_id: Mapped[int | None] = mapped_column(
        ForeignKey("series.id", ondelete="SET NULL"))
    source_series_id: Mapped[int | None] = mapped_column(
        ForeignKey("series.id", ondelete="SET NULL"), index=True)
    source_series_uid: Mapped[str | None] = mapped_column(UID)
    state: Mapped[CorrectionState] = mapped_column(str_enum(CorrectionState))
    reason: Mapped[str | None] = mapped_column(Text)
    writer: Mapped[str | None] = mapped_column(String(128))
    """Manufacturer and software of the SEG (which viewer wrote it)."""
    labels: Mapped[list[str]] = mapped_column(JSONType, default=list)
    """Keys of the model labels the correction's segments mapped to."""
    unmapped: Mapped[list[str]] = mapped_column(JSONType, default=list)
    """Segments that mapped to no label, as ``"number: label (code meaning)"``."""
    dice: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Dice per label key between the node's SEG and the correction (null: both empty)."""
    changed_slices: Mapped[list[int]] = mapped_column(JSONType, default=list)
    """Slices (0-based, along the slice normal) where the correction differs."""
    corrects_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    """The segment job whose SEG was compared with."""
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    """The model and version (``g1``, ``g1-local2``) whose SEG this corrects."""
    example_path: Mapped[str | None] = mapped_column(Text)
    """The training example, relative to the data directory."""
    superseded_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("corrections.id", ondelete="SET NULL"))
    trained_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    """The training job that learned from it."""


class NodeState(NodeBase):
    """Small named values the node keeps between runs (e.g. the sync client's cursor)."""

    __tablename__ = "node_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UploadState(StrEnum):
    """Where a weight delta is on its way to the federation server."""

    PENDING = "pending"
    """Waiting to be sent, or to be sent again after ``next_attempt_at``."""
    SENT = "sent"
    """The server took it (HTTP 202); ``server_update_id`` names it there."""
    REFUSED = "refused"
    """The server refused it for good (a 4xx answer a resend cannot change), or it could
    not be encoded; ``last_error`` says why. Never sent again."""


class FederationUpload(_Timestamps, NodeBase):
    """One weight delta of an accepted training run, to upload to the federation server.

    ``idempotency_key`` is fixed when the row is made and sent with every attempt, and the
    encoded bytes are kept at ``payload_path`` after the first encoding, so a resend after
    a lost answer or a crash is the same request and the server records the update once.
    """

    __tablename__ = "federation_uploads"
    __table_args__ = (Index("ix_federation_uploads_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[UploadState] = mapped_column(str_enum(UploadState),
                                               default=UploadState.PENDING)
    delta_path: Mapped[str] = mapped_column(Text)
    """The fp16 delta file the training run wrote."""
    payload_path: Mapped[str | None] = mapped_column(Text)
    """The encoded update, once encoded (the bytes every attempt sends)."""
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    base_generation: Mapped[int] = mapped_column(Integer)
    local_round: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    server_update_id: Mapped[str | None] = mapped_column(String(64))
    server_state: Mapped[str | None] = mapped_column(String(16))
    sent_at: Mapped[datetime | None] = mapped_column()


class FederationSync(NodeBase):
    """The sync client's state for one federation model (a node syncs one: one row).

    A table of its own rather than a ``node_state`` JSON value: its times are compared
    and shown, the lease is taken with one conditional UPDATE, and the columns say what
    the client keeps.
    """

    __tablename__ = "federation_sync"

    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The federation's model name (``leg``)."""
    last_poll_at: Mapped[datetime | None] = mapped_column()
    last_success_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    etag: Mapped[str | None] = mapped_column(String(256))
    """The ETag of the latest generation handled (sent back as If-None-Match)."""
    generation_pulled: Mapped[int | None] = mapped_column(Integer)
    """The newest generation pulled, verified and installed."""
    refused_generation: Mapped[int | None] = mapped_column(Integer)
    refused_reason: Mapped[str | None] = mapped_column(Text)
    refused_at: Mapped[datetime | None] = mapped_column()
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    """The process syncing now; another one waits until ``lease_until``."""
    lease_until: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
