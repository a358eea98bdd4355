"""Retention: old series and stale examples go; what training still needs stays."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from dafne_node.config import NodeConfig, load_config
from dafne_node.inference.segmenter import SeriesSegmenter
from dafne_node.retention import apply_retention
from db.base import utcnow
from db.node_models import Correction, CorrectionState, Job, JobKind, JobState, Series
from tests.conftest import WrittenStudy
from tests.learning.conftest import corrections, receive, run_all, write_seg
from tests.node.conftest import Node


def configured(node: Node, tmp_path: Path, text: str) -> NodeConfig:
    toml = tmp_path / "retention.toml"
    toml.write_text(f"[retention]\n{text}\n")
    return load_config(toml, environ={},
                       overrides={("node", "data_dir"): node[0].node.data_dir})


def delivered(node: Node) -> None:
    """The SEGs reached PACS: no job holds the series any more."""
    with node[1]() as session, session.begin():
        session.execute(update(Job).where(Job.state == JobState.SENDING)
                        .values(state=JobState.DONE, finished_at=utcnow()))


def source_series(node: Node, study: WrittenStudy) -> Series:
    with node[1]() as session:
        return session.scalars(select(Series).where(
            Series.series_instance_uid == study.study.series_instance_uid)).one()


def spool_files(node: Node, study: WrittenStudy) -> list[Path]:
    return list((node[0].spool_dir / study.study.study_instance_uid
                 / study.study.series_instance_uid).glob("*.dcm"))


def test_old_series_go_with_the_nodes_seg_and_corrections_then_are_unusable(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
) -> None:
    delivered(segmented)
    config = configured(segmented, tmp_path, "spool_max_age_days = 30")
    assert apply_retention(segmented[1], config).series == 0, "a day old: kept"
    assert spool_files(segmented, small_study)

    report = apply_retention(segmented[1], config, now=utcnow() + timedelta(days=31))
    assert report.series == 1 and report.bytes > 0
    assert spool_files(segmented, small_study) == []
    assert source_series(segmented, small_study).files_removed_at is not None
    assert not list((config.node.data_dir / "results").rglob("*.dcm")), "the node's SEG too"

    receive(segmented, write_seg(tmp_path, small_study, small_study.study.labels, segmenter))
    run_all(segmented, segmenter)
    [late] = corrections(segmented)
    assert late.state == CorrectionState.UNUSABLE
    assert "source images are gone" in late.reason


def test_a_series_whose_correction_waits_or_was_trained_lately_is_kept(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
) -> None:
    delivered(segmented)
    receive(segmented, write_seg(tmp_path, small_study, small_study.study.labels, segmenter))
    run_all(segmented, segmenter)
    config = configured(segmented, tmp_path, "spool_max_age_days = 30\n"
                        "keep_after_training_days = 10")
    later = utcnow() + timedelta(days=40)
    apply_retention(segmented[1], config, now=later)
    assert spool_files(segmented, small_study), "its correction waits for training"

    [correction] = corrections(segmented)
    example = config.node.data_dir / correction.example_path
    with segmented[1]() as session, session.begin():
        run = Job(kind=JobKind.TRAIN, state=JobState.DONE, payload={},
                  finished_at=later - timedelta(days=5))
        session.add(run)
        session.flush()
        session.execute(update(Correction).values(state=CorrectionState.TRAINED,
                                                  trained_job_id=run.id))
    apply_retention(segmented[1], config, now=later)
    assert spool_files(segmented, small_study) and example.exists(), "trained 5 days ago"

    report = apply_retention(segmented[1], config, now=later + timedelta(days=6))
    assert report.examples == 1 and not example.exists()
    assert spool_files(segmented, small_study) == []
    [correction] = corrections(segmented)
    assert correction.example_path is None


def test_over_its_size_the_spool_loses_its_oldest_series_first(
    segmented: Node, segmenter: SeriesSegmenter, small_study: WrittenStudy, tmp_path: Path,
) -> None:
    delivered(segmented)
    first = write_seg(tmp_path, small_study, small_study.study.labels, segmenter)
    receive(segmented, first)
    second = tmp_path / "second"
    second.mkdir()
    receive(segmented, write_seg(second, small_study, small_study.study.labels, segmenter))
    run_all(segmented, segmenter)
    older, newer = corrections(segmented)
    assert older.state == CorrectionState.SUPERSEDED and older.example_path

    config = configured(segmented, tmp_path, "spool_max_age_days = 365\nspool_max_gb = 1e-9")
    report = apply_retention(segmented[1], config)
    assert report.examples == 1, "the superseded example is never trained on: it goes"
    assert not (config.node.data_dir / older.example_path).exists()
    assert spool_files(segmented, small_study), "its newer correction still waits"
    with segmented[1]() as session:
        removed = session.scalars(select(Series.id).where(
            Series.files_removed_at.is_not(None))).all()
    assert sorted(removed) == sorted([older.seg_series_id, newer.seg_series_id])
