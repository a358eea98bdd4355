"""Fixtures for the node's stages: a node database with a spool, filled as the receiver does."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import NodeConfig, load_config
from dafne_node.inference.assemble import SeriesAssembler
from dafne_node.inference.segment import SegmentHandler
from dafne_node.inference.segmenter import SeriesSegmenter
from dafne_node.jobs.runner import JobRunner
from db.base import utcnow
from db.migrate import upgrade
from db.node_models import JobKind
from db.repository import index_instances
from db.session import make_engine, make_session_factory
from dicom_scp.store import ReceivedInstance
from tests.conftest import WrittenStudy

Node = tuple[NodeConfig, sessionmaker[Session]]


@pytest.fixture(scope="session")
def segmenter() -> SeriesSegmenter:
    return SeriesSegmenter()


def make_node(folder: Path) -> Node:
    """An empty node (SQLite database, spool) delivering to one destination, ``pacs``."""
    toml = folder / "node.toml"
    toml.write_text('default_destination = "pacs"\n[[destinations]]\nname = "pacs"\n'
                    'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n')
    config = load_config(toml, environ={}, overrides={("node", "data_dir"): folder / "data"})
    engine = make_engine(config.database_url)
    upgrade(engine)
    return config, make_session_factory(engine)


def segment_runner(node: Node, segmenter: SeriesSegmenter, worker_id: str = "w1") -> JobRunner:
    """A job runner that runs segment jobs, as a node's worker does."""
    config, sessions = node
    return JobRunner(sessions, {JobKind.SEGMENT: SegmentHandler(sessions, config, segmenter)},
                     worker_id)


def spool_series(node: Node, files: Sequence[Path], *, received_at: datetime) -> None:
    """Spool and index ``files`` as received at ``received_at``, then run the assembler.

    The index is filled from each file's header, read as far as the pixel data, so
    files broken after that point are received as they would be from a peer.
    """
    config, sessions = node
    records = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        relative = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        (config.spool_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, config.spool_dir / relative)
        records.append(ReceivedInstance(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            spool_path=relative, size_bytes=path.stat().st_size, received_at=received_at,
            calling_ae="ORTHANC", modality=ds.get("Modality")))
    with sessions() as session, session.begin():
        index_instances(session.connection(), records)
    SeriesAssembler(sessions, config).run_once()


@pytest.fixture
def node(tmp_path: Path, small_study: WrittenStudy) -> Node:
    """A node database and spool holding the small phantom series, received a minute ago."""
    created = make_node(tmp_path)
    spool_series(created, small_study.files.images, received_at=utcnow() - timedelta(minutes=1))
    return created
