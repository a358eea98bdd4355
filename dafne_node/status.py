"""What the node has received, what it is doing and what is stuck: for the people who run it.

One function, :func:`collect_status`, answers the questions a PACS administrator or the
hospital's IT asks of a DICOM node: is it receiving, what is queued or failed, what is waiting
in the outbox (and why), which series were skipped (and why), which model is in use.
``dafne-node status`` prints it with :func:`format_status`, the admin API serves it as JSON at
``/status`` and the Prometheus collector reuses the same count queries, so every view of the
node agrees.

Everything here is grouped ``COUNT`` queries and short ``LIMIT``-ed lists: a node that has
received millions of instances answers as fast as an empty one, and no row is loaded just to
be counted. The database is the only source, so several node processes sharing one database
report the same numbers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dafne_node.config import FederationSection
from dafne_node.learning.windows import TrainingWindow, next_opening, open_window
from dafne_node.model_registry import active_model, version_label
from db.base import utcnow
from db.corrections import correction_counts, list_corrections, new_example_count
from db.federation_sync import upload_counts
from db.jobs import active_job
from db.node_models import (
    Correction,
    CorrectionState,
    FederationSync,
    FederationUpload,
    Instance,
    Job,
    JobKind,
    JobState,
    OutboxItem,
    OutboxState,
    Series,
    SeriesState,
    Study,
    UploadState,
)
from db.repository import count_instances

__all__ = [
    "CorrectionItem",
    "DestinationOutbox",
    "FailedJob",
    "FederationStatus",
    "FederationUploadItem",
    "ModelInfo",
    "NodeStatus",
    "OutboxStatus",
    "SkippedSeries",
    "TrainingRun",
    "TrainingStatus",
    "collect_status",
    "correction_counts",
    "correction_items",
    "count_instances",
    "count_jobs",
    "count_outbox",
    "count_outbox_by_destination",
    "count_series",
    "format_corrections",
    "format_status",
    "upload_counts",
]

LOGGER = logging.getLogger(__name__)

DEFAULT_RECENT = 10
"""How many skipped series and failed jobs a status lists by default."""

_UNDELIVERED = (OutboxState.PENDING, OutboxState.SENDING, OutboxState.FAILED)


class ModelInfo(BaseModel):
    """The segmentation model in use."""

    name: str
    generation: int
    version: str | None = Field(
        default=None, description="g1 for a root generation, g1-local2 for a local model")


class TrainingRun(BaseModel):
    """The outcome of the last finished training run."""

    job_id: int
    outcome: str = Field(description="accepted, rejected, nothing to train, or failed")
    reason: str | None = None
    model: str | None = Field(default=None, description="the new local model, if accepted")
    finished_at: datetime | None = None


class TrainingStatus(BaseModel):
    """Where learning stands: windows, waiting examples, the current and the last run."""

    window_open_until: datetime | None = Field(
        default=None, description="end of the training window open now")
    next_window_at: datetime | None = None
    waiting_examples: int = Field(description="corrections queued for training")
    new_examples: int = Field(description="of those, arrived since the last run was queued")
    current_run: int | None = Field(default=None, description="the queued or running job")
    current_state: str | None = None
    current_note: str | None = Field(
        default=None, description="why a queued run waits (e.g. paused at a window's end)")
    last_run: TrainingRun | None = None


class DestinationOutbox(BaseModel):
    """Undelivered files for one destination, and the last reason delivery failed."""

    destination: str = Field(description="AE@host:port")
    name: str | None = Field(default=None, description="configured destination name, if any")
    pending: int = 0
    sending: int = 0
    failed: int = 0
    oldest_at: datetime | None = Field(
        default=None, description="when the oldest undelivered file was queued"
    )
    max_attempts: int = 0
    last_error: str | None = None


class OutboxStatus(BaseModel):
    """Counts of outbox items by state, and what is undelivered per destination."""

    states: dict[str, int]
    destinations: list[DestinationOutbox] = Field(default_factory=list)


class SkippedSeries(BaseModel):
    """A series the node decided not to process, with the reason."""

    series_instance_uid: str
    series_description: str | None = None
    modality: str | None = None
    calling_ae: str | None = None
    num_instances: int = 0
    reason: str | None = None
    at: datetime


class FailedJob(BaseModel):
    """A job that gave up, with its error; retry with ``POST /jobs/{id}/retry``."""

    id: int
    kind: str
    series_instance_uid: str | None = None
    error: str | None = None
    attempts: int = 0
    at: datetime | None = None


class CorrectionItem(BaseModel):
    """One SEG a viewer sent back and what the node made of it (``dafne-node corrections``)."""

    id: int
    state: CorrectionState
    received_at: datetime
    source_series_uid: str | None = None
    labels: list[str] = Field(description="model label keys the correction's segments map to")
    unmapped: list[str] = Field(description="segments that map to no label")
    dice: dict[str, float | None] = Field(
        description="Dice per label between the node's SEG and the correction")
    changed_slices: int = Field(description="slices where the correction differs")
    reason: str | None = None
    writer: str | None = Field(default=None, description="the viewer that wrote the SEG")
    model: str | None = Field(default=None, description="the model version it corrects")
    superseded_by: int | None = None

    @classmethod
    def from_row(cls, row: Correction) -> CorrectionItem:
        """The API's view of a ``corrections`` row."""
        model = " ".join(part for part in (row.model_name, row.model_version) if part)
        return cls(
            id=row.id, state=row.state, received_at=row.created_at,
            source_series_uid=row.source_series_uid, labels=row.labels,
            unmapped=row.unmapped, dice=row.dice, changed_slices=len(row.changed_slices),
            reason=row.reason, writer=row.writer, model=model or None,
            superseded_by=row.superseded_by_id,
        )


def correction_items(session: Session, *, limit: int = 100,
                     state: CorrectionState | None = None) -> list[CorrectionItem]:
    """The newest corrections first, optionally only those in ``state``."""
    rows = list_corrections(session, limit=limit, states=[state] if state else [])
    return [CorrectionItem.from_row(row) for row in rows]


class FederationUploadItem(BaseModel):
    """The newest weight delta queued for the federation and how its upload went."""

    id: int
    state: str = Field(description="pending, sent or refused")
    base_generation: int
    local_round: int
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = Field(
        default=None, description="when a pending upload is tried again")
    sent_at: datetime | None = None
    server_update_id: str | None = None
    server_state: str | None = None
    last_error: str | None = None


class FederationStatus(BaseModel):
    """Where the node stands with the federation server: the pull and the uploads."""

    enabled: bool = Field(description="whether [federation] url is set")
    url: str | None = None
    model: str | None = Field(default=None, description="the federation's model name")
    generation_in_use: int | None = Field(
        default=None, description="root generation of the model in use")
    generation_pulled: int | None = Field(
        default=None, description="newest generation pulled from the federation")
    last_poll_at: datetime | None = None
    last_success_at: datetime | None = None
    last_error: str | None = None
    uploads: dict[str, int] = Field(
        default_factory=dict, description="uploads by state (every state present)")
    last_upload: FederationUploadItem | None = None
    refused_generation: int | None = Field(
        default=None, description="the last generation that failed verification")
    refused_reason: str | None = None
    refused_at: datetime | None = None


class NodeStatus(BaseModel):
    """A snapshot of the node, as served at ``/status`` and printed by ``dafne-node status``."""

    generated_at: datetime
    model: ModelInfo
    instances_received: int
    studies: int
    series: dict[str, int] = Field(description="series by state")
    last_received_at: datetime | None = None
    jobs: dict[str, int] = Field(description="jobs by state (every state present)")
    jobs_by_kind: dict[str, dict[str, int]] = Field(description="kind -> state -> count")
    outbox: OutboxStatus
    corrections: dict[str, int] = Field(description="corrections by state (every state present)")
    training: TrainingStatus
    disk_bytes: dict[str, int] = Field(
        default_factory=dict, description="bytes used by the spool, examples, models, results")
    skipped_series: list[SkippedSeries] = Field(default_factory=list)
    failed_jobs: list[FailedJob] = Field(default_factory=list)
    federation: FederationStatus = Field(
        default_factory=lambda: FederationStatus(enabled=False))


# -- counts (shared with the Prometheus collector) ---------------------------------------


def _count_by_state(session: Session, column: Any, states: type[StrEnum]) -> dict[str, int]:
    """Rows by ``column``; every member of ``states`` is present, with 0 if none."""
    counts = {state.value: 0 for state in states}
    for state, count in session.execute(select(column, func.count()).group_by(column)):
        counts[states(state).value] = int(count)
    return counts


def count_series(session: Session) -> dict[str, int]:
    """Series by state; every :class:`SeriesState` is present, with 0 if none."""
    return _count_by_state(session, Series.state, SeriesState)


def count_jobs(session: Session) -> dict[str, dict[str, int]]:
    """Jobs by kind, then state; every kind and state is present, with 0 if none.

    One query grouped by (kind, state) serves both the per-state totals and the
    per-kind breakdown, and the metric with both labels.
    """
    counts = {kind.value: {state.value: 0 for state in JobState} for kind in JobKind}
    rows = session.execute(
        select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
    )
    for kind, state, count in rows:
        counts[JobKind(kind).value][JobState(state).value] = int(count)
    return counts


def count_outbox(session: Session) -> dict[str, int]:
    """Outbox items by state; every :class:`OutboxState` is present, with 0 if none."""
    return _count_by_state(session, OutboxItem.state, OutboxState)


class _DestinationKey(NamedTuple):
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def count_outbox_by_destination(
    session: Session, *, errors_scanned: int = 200
) -> list[DestinationOutbox]:
    """Undelivered outbox items per destination (``AE@host:port``), most pending first.

    Delivered items are left out (they only grow and say nothing about trouble), so the
    query walks the ``(state, next_attempt_at)`` index rather than the whole table. The last
    error of each destination comes from the ``errors_scanned`` most recently updated
    undelivered items that have one: enough to name the reason without a per-destination
    query.
    """
    key_columns = (OutboxItem.ae_title, OutboxItem.host, OutboxItem.port)
    rows = session.execute(
        select(
            *key_columns,
            OutboxItem.state,
            func.count(),
            func.min(OutboxItem.created_at),
            func.max(OutboxItem.attempts),
            func.max(OutboxItem.destination),
        )
        .where(OutboxItem.state.in_(_UNDELIVERED))
        .group_by(*key_columns, OutboxItem.state)
    )
    by_key: dict[_DestinationKey, DestinationOutbox] = {}
    for ae_title, host, port, state, count, oldest, attempts, name in rows:
        key = _DestinationKey(ae_title, host, int(port))
        entry = by_key.get(key)
        if entry is None:
            entry = by_key[key] = DestinationOutbox(destination=str(key), name=name)
        setattr(entry, OutboxState(state).value, int(count))
        if oldest is not None and (entry.oldest_at is None or oldest < entry.oldest_at):
            entry.oldest_at = oldest
        entry.max_attempts = max(entry.max_attempts, int(attempts or 0))
        entry.name = entry.name or name
    if by_key and errors_scanned > 0:
        errors = session.execute(
            select(*key_columns, OutboxItem.last_error)
            .where(OutboxItem.state.in_(_UNDELIVERED), OutboxItem.last_error.is_not(None))
            .order_by(OutboxItem.updated_at.desc(), OutboxItem.id.desc())
            .limit(errors_scanned)
        )
        for ae_title, host, port, error in errors:
            entry = by_key.get(_DestinationKey(ae_title, host, int(port)))
            if entry is not None and entry.last_error is None:
                entry.last_error = error
    return sorted(
        by_key.values(), key=lambda d: (-(d.pending + d.sending + d.failed), d.destination)
    )


# -- the snapshot --------------------------------------------------------------------------


def _recent_skipped(session: Session, limit: int) -> list[SkippedSeries]:
    rows = session.execute(
        select(
            Series.series_instance_uid,
            Series.series_description,
            Series.modality,
            Series.calling_ae,
            Series.num_instances,
            Series.state_reason,
            Series.completed_at,
            Series.last_received_at,
        )
        .where(Series.state == SeriesState.SKIPPED)
        .order_by(Series.last_received_at.desc(), Series.id.desc())
        .limit(limit)
    )
    return [
        SkippedSeries(
            series_instance_uid=uid,
            series_description=description,
            modality=modality,
            calling_ae=calling_ae,
            num_instances=int(num_instances or 0),
            reason=reason,
            at=completed_at or last_received_at,
        )
        for uid, description, modality, calling_ae, num_instances, reason, completed_at,
        last_received_at in rows
    ]


def _recent_failed(session: Session, limit: int) -> list[FailedJob]:
    rows = session.execute(
        select(
            Job.id,
            Job.kind,
            Series.series_instance_uid,
            Job.error,
            Job.attempts,
            Job.finished_at,
            Job.updated_at,
        )
        .outerjoin(Series, Job.series_id == Series.id)
        .where(Job.state == JobState.FAILED)
        .order_by(Job.updated_at.desc(), Job.id.desc())
        .limit(limit)
    )
    return [
        FailedJob(
            id=int(job_id),
            kind=JobKind(kind).value,
            series_instance_uid=series_uid,
            error=error,
            attempts=int(attempts or 0),
            at=finished_at or updated_at,
        )
        for job_id, kind, series_uid, error, attempts, finished_at, updated_at in rows
    ]


def collect_status(
    session: Session,
    *,
    model_name: str,
    model_generation: int,
    now: datetime | None = None,
    recent: int = DEFAULT_RECENT,
    windows: Sequence[TrainingWindow] = (),
    data_dir: Path | None = None,
    federation: FederationSection | None = None,
) -> NodeStatus:
    """Take a snapshot of the node from its database.

    Parameters
    ----------
    session : Session
        A session on the node's database (only read from).
    model_name, model_generation : str, int
        The model in use. Passed in rather than read here so that a status never needs the
        model files (or torch) and reports what the running node actually loaded.
    now : datetime, optional
        The snapshot's time (aware); the current time by default.
    recent : int
        How many skipped series and failed jobs to list (newest first).
    windows : sequence of TrainingWindow
        The node's training windows, for the open and the next one.
    data_dir : Path, optional
        The node's data directory, to report the disk it uses.
    federation : FederationSection, optional
        The node's ``[federation]`` settings (off when not given).

    Raises
    ------
    ValueError
        If ``now`` is naive or ``recent`` is negative.
    """
    if now is None:
        now = utcnow()
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if recent < 0:
        raise ValueError("recent must be >= 0")
    jobs_by_kind = count_jobs(session)
    jobs = {state.value: 0 for state in JobState}
    for states in jobs_by_kind.values():
        for state, count in states.items():
            jobs[state] += count
    last_received_at = session.scalar(select(func.max(Series.last_received_at)))
    corrections = correction_counts(session)
    active = active_model(session, model_name)
    version = (version_label(active.generation, active.local_round) if active is not None
               else f"g{model_generation}")
    return NodeStatus(
        generated_at=now.astimezone(UTC),
        model=ModelInfo(name=model_name, generation=model_generation, version=version),
        instances_received=count_instances(session),
        studies=int(session.scalar(select(func.count()).select_from(Study)) or 0),
        series=count_series(session),
        last_received_at=last_received_at,
        jobs=jobs,
        jobs_by_kind=jobs_by_kind,
        outbox=OutboxStatus(
            states=count_outbox(session),
            destinations=count_outbox_by_destination(session),
        ),
        corrections=corrections,
        training=_training_status(session, windows, now, corrections),
        disk_bytes=_disk_use(session, data_dir) if data_dir is not None else {},
        skipped_series=_recent_skipped(session, recent) if recent else [],
        failed_jobs=_recent_failed(session, recent) if recent else [],
        federation=_federation_status(session, federation, active.generation
                                      if active is not None else model_generation),
    )


def _training_status(session: Session, windows: Sequence[TrainingWindow], now: datetime,
                     corrections: dict[str, int]) -> TrainingStatus:
    window = open_window(windows, now) if windows else None
    upcoming = next_opening(windows, now) if windows else None
    current = active_job(session, JobKind.TRAIN)
    last = session.scalars(
        select(Job).where(Job.kind == JobKind.TRAIN,
                          Job.state.in_([JobState.DONE, JobState.FAILED]))
        .order_by(Job.finished_at.desc(), Job.id.desc()).limit(1)
    ).first()
    last_run = None
    if last is not None:
        result = last.result or {}
        last_run = TrainingRun(
            job_id=last.id,
            outcome=str(result.get("outcome") or last.state.value),
            reason=result.get("reason") or last.error,
            model=result.get("version_label") if result.get("outcome") == "accepted" else None,
            finished_at=last.finished_at,
        )
    return TrainingStatus(
        window_open_until=window.closes_at if window else None,
        next_window_at=upcoming.opened_at if upcoming else None,
        waiting_examples=corrections.get(CorrectionState.QUEUED.value, 0),
        new_examples=new_example_count(session)[0],
        current_run=current.id if current else None,
        current_state=current.state.value if current else None,
        current_note=current.error if current else None,
        last_run=last_run,
    )


def _federation_status(session: Session, federation: FederationSection | None,
                       generation: int) -> FederationStatus:
    """The sync's state; three short queries, none for a node that does not federate."""
    if federation is None or federation.url is None:
        return FederationStatus(enabled=False)
    newest = session.scalars(
        select(FederationUpload).order_by(FederationUpload.id.desc()).limit(1)).first()
    last_upload = None
    if newest is not None:
        last_upload = FederationUploadItem(
            id=newest.id, state=newest.state.value, base_generation=newest.base_generation,
            local_round=newest.local_round, attempts=newest.attempts,
            created_at=newest.created_at,
            next_attempt_at=(newest.next_attempt_at
                             if newest.state == UploadState.PENDING else None),
            sent_at=newest.sent_at, server_update_id=newest.server_update_id,
            server_state=newest.server_state, last_error=newest.last_error)
    status = FederationStatus(
        enabled=True, url=re.sub(r"//[^/@]*@", "//", federation.url),  # no credentials
        model=federation.model, generation_in_use=generation, uploads=upload_counts(session),
        last_upload=last_upload)
    sync = session.get(FederationSync, federation.model)
    if sync is not None:
        status.generation_pulled = sync.generation_pulled
        status.last_poll_at = sync.last_poll_at
        status.last_success_at = sync.last_success_at
        status.last_error = sync.last_error
        status.refused_generation = sync.refused_generation
        status.refused_reason = sync.refused_reason
        status.refused_at = sync.refused_at
    return status


def _disk_use(session: Session, data_dir: Path) -> dict[str, int]:
    """Bytes in the spool (from the index: no walk over millions of files) and the rest."""
    spool = session.scalar(
        select(func.coalesce(func.sum(Instance.size_bytes), 0))
        .join(Series, Series.id == Instance.series_id)
        .where(Series.files_removed_at.is_(None))) or 0
    use = {"spool": int(spool)}
    for folder in ("examples", "models", "results"):
        path = data_dir / folder
        use[folder] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) \
            if path.is_dir() else 0
    return use


# -- for a terminal ------------------------------------------------------------------------


def _since(then: datetime, now: datetime) -> str:
    """``30 s ago``, ``12 min ago``, ``3 h 5 min ago``, ``4 days ago``."""
    seconds = int((now - then).total_seconds())
    if seconds < 0:
        return "just now"  # clocks of several hosts differ a little
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
    return f"{seconds // 86400} days ago"


def _ago(then: datetime | None, now: datetime) -> str:
    """Relative time first (what a reader wants), the exact UTC time after."""
    if then is None:
        return "never"
    return f"{_since(then, now)} ({then:%Y-%m-%d %H:%M:%S} UTC)"


def _counts(counts: dict[str, int]) -> str:
    return "  ".join(f"{name} {count}" for name, count in counts.items())


def _one_line(text: str | None, width: int = 100) -> str:
    """The gist of an error on one line: a traceback's last line, whitespace collapsed."""
    if not text or not text.strip():
        return "(no message)"
    if text.lstrip().startswith("Traceback"):
        text = text.strip().splitlines()[-1]
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _size(count: int) -> str:
    """``512 B``, ``3.4 MiB``, ``12.0 GiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _training_lines(training: TrainingStatus, now: datetime) -> list[str]:
    if training.window_open_until is not None:
        window = f"open until {training.window_open_until:%Y-%m-%d %H:%M} UTC"
    elif training.next_window_at is not None:
        window = f"next window {training.next_window_at:%Y-%m-%d %H:%M} UTC"
    else:
        window = "no training window configured"
    lines = [f"Training:  {window}; {training.waiting_examples} example(s) waiting, "
             f"{training.new_examples} new since the last run"]
    if training.current_run is not None:
        note = f" ({_one_line(training.current_note)})" if training.current_note else ""
        lines.append(f"           run #{training.current_run} {training.current_state}{note}")
    if training.last_run is not None:
        run = training.last_run
        when = f", {_since(run.finished_at, now)}" if run.finished_at else ""
        model = f", model {run.model}" if run.model else ""
        lines.append(f"           last run #{run.job_id}: {run.outcome}{model}{when}")
        if run.reason:
            lines.append(f"             {_one_line(run.reason)}")
    return lines


def _federation_lines(federation: FederationStatus, now: datetime) -> list[str]:
    if not federation.enabled:
        return ["Federation: off"]
    pulled = (f", pulled g{federation.generation_pulled}"
              if federation.generation_pulled is not None else "")
    lines = [
        f"Federation: {federation.url}, model {federation.model}; generation in use "
        f"g{federation.generation_in_use}{pulled}",
        f"            last poll {_ago(federation.last_poll_at, now)}, last success "
        f"{_since(federation.last_success_at, now) if federation.last_success_at else 'never'}",
        f"            uploads: {_counts(federation.uploads)}",
    ]
    upload = federation.last_upload
    if upload is not None:
        detail = {
            "sent": f"sent {_since(upload.sent_at, now)}" if upload.sent_at else "sent",
            "pending": f"pending after {upload.attempts} attempt(s)",
            "refused": "refused",
        }.get(upload.state, upload.state)
        server = f", server id {upload.server_update_id}" if upload.server_update_id else ""
        lines.append(f"            last upload #{upload.id} (g{upload.base_generation}-local"
                     f"{upload.local_round}): {detail}{server}")
        if upload.last_error:
            lines.append(f"              {_one_line(upload.last_error)}")
    if federation.last_error:
        lines.append(f"            last error: {_one_line(federation.last_error)}")
    if federation.refused_generation is not None:
        lines.append(f"            refused generation {federation.refused_generation}: "
                     f"{_one_line(federation.refused_reason)}")
    return lines


def _federation_attention(federation: FederationStatus) -> list[str]:
    items = []
    refused = federation.uploads.get("refused", 0)
    if refused:
        items.append(f"{refused} weight delta(s) refused by the federation server: reasons "
                     "in the server's answers (logged)")
    in_use = federation.generation_in_use or 0
    if federation.refused_generation is not None and federation.refused_generation > in_use:
        items.append(f"generation {federation.refused_generation} from the federation was "
                     "refused (the model in use was kept): see Federation above")
    elif federation.enabled and federation.last_error:
        items.append("the federation sync failed last time: see Federation above")
    return items


def format_status(status: NodeStatus, *, active_window: timedelta = timedelta(minutes=5)) -> str:
    """Render a status for a terminal: the answers first, the details after.

    The first lines say whether the node is receiving and whether anything needs a person
    (failed jobs, undelivered SEGs, skipped series); the sections below name the series,
    destinations and errors, so the reader knows where to look without reading SQL.

    Parameters
    ----------
    status : NodeStatus
        From :func:`collect_status`.
    active_window : timedelta
        Last instance younger than this counts as "receiving now".
    """
    now = status.generated_at
    lines = [
        f"Dafne Node status at {now:%Y-%m-%d %H:%M:%S} UTC",
        f"Model:     {status.model.name}, generation {status.model.generation}"
        + (f" (local model {status.model.version}, fine-tuned on this node's corrections)"
           if status.model.version and "local" in status.model.version else ""),
    ]
    if status.last_received_at is None:
        receiving = "nothing received yet"
    elif now - status.last_received_at <= active_window:
        receiving = f"yes, last instance {_ago(status.last_received_at, now)}"
    else:
        receiving = f"idle, last instance {_ago(status.last_received_at, now)}"
    lines.append(f"Receiving: {receiving}")
    lines.append(
        f"Received:  {status.instances_received} instances in "
        f"{sum(status.series.values())} series of {status.studies} studies"
    )
    lines.append(f"Series:    {_counts(status.series)}")
    lines.append(f"Jobs:      {_counts(status.jobs)}")
    lines.append(f"Outbox:    {_counts(status.outbox.states)}")
    lines.append(f"Corrections: {_counts(status.corrections)}")
    lines.extend(_training_lines(status.training, now))
    lines.extend(_federation_lines(status.federation, now))
    if status.disk_bytes:
        lines.append("Disk:      " + "  ".join(
            f"{name} {_size(size)}" for name, size in status.disk_bytes.items()))

    attention: list[str] = []
    failed = status.jobs.get(JobState.FAILED.value, 0)
    if failed:
        attention.append(
            f"{failed} failed job(s): retry with `dafne-node jobs retry ID` "
            "or POST /jobs/ID/retry"
        )
    undelivered = sum(d.pending + d.sending + d.failed for d in status.outbox.destinations)
    if undelivered:
        attention.append(
            f"{undelivered} file(s) not yet delivered to "
            f"{len(status.outbox.destinations)} destination(s)"
        )
    skipped = status.series.get(SeriesState.SKIPPED.value, 0)
    if skipped:
        attention.append(f"{skipped} series skipped (not segmented): reasons below")
    attention.extend(_federation_attention(status.federation))
    lines.append("")
    if attention:
        lines.append("Needs attention:")
        lines.extend(f"  ! {item}" for item in attention)
    else:
        lines.append("Nothing needs attention.")

    if status.outbox.destinations:
        lines += ["", "Outbox by destination (undelivered):"]
        for dest in status.outbox.destinations:
            name = f" ({dest.name})" if dest.name else ""
            attempts = f", up to {dest.max_attempts} attempts" if dest.max_attempts else ""
            oldest = f", oldest queued {_since(dest.oldest_at, now)}" if dest.oldest_at else ""
            lines.append(
                f"  {dest.destination}{name}: {dest.pending} pending, {dest.sending} sending, "
                f"{dest.failed} failed{attempts}{oldest}"
            )
            if dest.last_error:
                lines.append(f"      last error: {_one_line(dest.last_error)}")
    if status.failed_jobs:
        lines += ["", f"Failed jobs (latest {len(status.failed_jobs)}):"]
        for job in status.failed_jobs:
            series = job.series_instance_uid or "-"
            lines.append(
                f"  #{job.id} {job.kind}, series {series}, {job.attempts} attempt(s), "
                f"failed {_since(job.at, now) if job.at else '(time unknown)'}"
            )
            lines.append(f"      error: {_one_line(job.error)}")
    if status.skipped_series:
        lines += ["", f"Skipped series (latest {len(status.skipped_series)}):"]
        for entry in status.skipped_series:
            description = f' "{entry.series_description}"' if entry.series_description else ""
            sender = entry.calling_ae or "unknown AE"
            lines.append(
                f"  {entry.series_instance_uid}{description} ({entry.modality or '?'}, "
                f"{entry.num_instances} instances) from {sender}, {_since(entry.at, now)}"
            )
            lines.append(f"      reason: {entry.reason or '(none recorded)'}")
    return "\n".join(lines) + "\n"


def format_corrections(items: list[CorrectionItem]) -> str:
    """Render corrections for a terminal: one block per correction, newest first."""
    if not items:
        return "No corrections received yet.\n"
    lines = []
    for item in items:
        dice = ", ".join(f"{key} {'-' if value is None else f'{value:.3f}'}"
                         for key, value in item.dice.items())
        lines.append(f"#{item.id} {item.state.value:<10} {item.received_at:%Y-%m-%d %H:%M} UTC  "
                     f"series {item.source_series_uid or '-'}")
        if item.writer or item.model:
            lines.append(f"      from {item.writer or 'unknown writer'}, corrects "
                         f"{item.model or 'no SEG of the node'}")
        if item.labels:
            lines.append(f"      labels: {', '.join(item.labels)}; {item.changed_slices} "
                         "slice(s) changed")
        if dice:
            lines.append(f"      Dice node vs correction: {dice}")
        if item.unmapped:
            lines.append(f"      not mapped: {'; '.join(item.unmapped)}")
        if item.reason:
            lines.append(f"      reason: {_one_line(item.reason, 200)}")
    return "\n".join(lines) + "\n"
