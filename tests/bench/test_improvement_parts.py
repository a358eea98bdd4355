"""The multi-hospital run's parts: the simulated radiologist and the cached weak root."""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.improvement import hospital, root
from bench.improvement.hospital import ArmStoppedError, Hospital, HospitalPlan, NodeSettings
from bench.improvement.radiologist import (
    correct,
    label_permutation,
    poison_label_flip,
    read_seg_labels,
    slice_dice,
    write_correction,
)
from dafne_node.model.manifest import load_model_dir
from dafne_node.model.preprocess import PreprocessConfig
from dafne_node.model.train import DEFAULT_PREPROCESSING, TrainingExample
from dafne_node.phantom import make_study
from dafne_node.phantom.study import write_study
from dicom_scp.receiver import StorageServer
from dicom_scp.spool import Spool
from tests.dicom_scp.helpers import MemoryIndex
from tests.federation.server import free_port, set_up

MUSCLES = (1, 2, 3, 4, 5, 6)


def maps() -> tuple[np.ndarray, np.ndarray]:
    """Four 4x5 slices: agreeing, half-found, empty, nearly right."""
    truth = np.zeros((4, 4, 5), dtype=np.uint8)
    predicted = np.zeros_like(truth)
    truth[0, :2] = 1
    predicted[0, :2] = 1  # Dice 1
    truth[1, 0, :4] = 3
    predicted[1, 0, :2] = 3  # label 3: 2*2 / (2 + 4) = 0.667
    # slice 2: nothing in either map
    truth[3, :2] = 2
    predicted[3, :2] = 2
    predicted[3, 1, 4] = 0  # label 2: 2*9 / (9 + 10) = 0.947
    return predicted, truth


def test_slice_dice_averages_the_labels_present() -> None:
    predicted, truth = maps()
    dice = slice_dice(predicted, truth, MUSCLES)
    assert dice[0] == 1.0
    assert dice[1] == pytest.approx(2 / 3)
    assert math.isnan(dice[2])
    assert dice[3] == pytest.approx(18 / 19)


def test_without_threshold_every_slice_becomes_the_truth() -> None:
    predicted, truth = maps()
    result = correct(predicted, truth, labels=MUSCLES)
    np.testing.assert_array_equal(result.label_map, truth)
    assert result.corrected_slices == (1, 3)
    assert result.label_map is not truth


@pytest.mark.parametrize(("threshold", "expected"), [(0.5, ()), (0.8, (1,)), (0.95, (1, 3)),
                                                     (1.0, (1, 3))])
def test_threshold_redraws_only_the_slices_below_it(threshold: float,
                                                    expected: tuple[int, ...]) -> None:
    predicted, truth = maps()
    result = correct(predicted, truth, labels=MUSCLES, slice_dice_threshold=threshold)
    assert result.corrected_slices == expected
    for index in range(len(truth)):
        want = truth if index in expected else predicted
        np.testing.assert_array_equal(result.label_map[index], want[index])
    assert result.label_map.dtype == truth.dtype


def test_a_missed_muscle_counts_against_the_slice() -> None:
    predicted, truth = maps()
    predicted[0, 3, 0] = 5  # a stray muscle the truth does not have: slice 0 Dice (1 + 0) / 2
    result = correct(predicted, truth, labels=MUSCLES, slice_dice_threshold=0.8)
    assert result.corrected_slices == (0, 1)


def test_correct_refuses_bad_input() -> None:
    predicted, truth = maps()
    with pytest.raises(ValueError, match="same shape"):
        correct(predicted[:2], truth, labels=MUSCLES)
    with pytest.raises(ValueError, match="threshold"):
        correct(predicted, truth, labels=MUSCLES, slice_dice_threshold=1.5)


def test_label_flip_is_a_seeded_derangement() -> None:
    mapping = label_permutation(MUSCLES, seed=4)
    assert sorted(mapping) == sorted(mapping.values()) == list(MUSCLES)
    assert all(source != target for source, target in mapping.items())
    assert label_permutation(MUSCLES, seed=4) == mapping
    assert any(label_permutation(MUSCLES, seed=s) != mapping for s in range(5, 10))

    _, truth = maps()
    truth[2, 3, 4] = 9  # not a muscle: kept
    flipped = poison_label_flip(truth, labels=MUSCLES, seed=4)
    expected = truth.copy()
    for source, target in mapping.items():
        expected[truth == source] = target
    np.testing.assert_array_equal(flipped, expected)
    assert flipped[2, 3, 4] == 9
    np.testing.assert_array_equal(flipped == 0, truth == 0)


def test_correction_seg_round_trips_through_the_node_decoder(tmp_path: Path) -> None:
    study = make_study(site="A", seed=3, slices=6, matrix=128)
    files = write_study(study, tmp_path / "study")
    labels = np.asarray(study.labels)
    assert labels.any()

    # The phantom's truth SEG is written by the node's own encoder, as its results are.
    np.testing.assert_array_equal(read_seg_labels(files.truth, files.images), labels)

    flipped = poison_label_flip(labels, labels=MUSCLES, seed=0)
    out = write_correction(files.images, flipped, tmp_path / "correction.dcm")
    assert out.exists()
    np.testing.assert_array_equal(read_seg_labels(out, files.images), flipped)


def test_weak_root_is_built_once_per_parameter_set(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = {"subjects": 1, "steps": 3, "slices": 6, "val_subjects": 0}
    first = root.weak_root(tmp_path, **tiny)
    manifest = load_model_dir(first).manifest
    assert manifest.training is not None
    assert manifest.training["report"]["steps"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached weak root was built again")

    monkeypatch.setattr(root, "build_weak_root", no_rebuild)
    started = time.perf_counter()
    assert root.weak_root(tmp_path, **tiny) == first
    assert time.perf_counter() - started < 5.0
    assert root.cache_key(**{**tiny, "steps": 6}) != root.cache_key(**tiny)

    study = make_study(site="C", seed=0, slices=4, matrix=128)
    dice = root.starting_dice(first, {"C": [TrainingExample(study.pixels, study.labels,
                                                            tuple(study.pixel_spacing))]})
    assert set(dice) == {"C"} and 0.0 <= dice["C"] <= 1.0


def test_a_shipped_root_is_used_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = {"subjects": 1, "steps": 2, "slices": 4, "val_subjects": 0}
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    built = root.weak_root(tmp_path / "elsewhere", shipped_dir=shipped, **tiny)
    built.rename(shipped / built.name)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a shipped weak root was built again")

    monkeypatch.setattr(root, "build_weak_root", no_build)
    cache = tmp_path / "cache"
    assert root.weak_root(cache, shipped_dir=shipped, **tiny) == shipped / built.name
    assert not cache.exists()  # nothing cached beside it


def test_a_cpu_without_bf16_starts_from_the_root_shipped_in_bf16(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented run and its ``--clean`` comparisons start from one root on any CPU."""
    tiny = {"subjects": 1, "steps": 2, "slices": 4, "val_subjects": 0}
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    # built in fp32 (emulated bf16 takes minutes) and shipped under the bf16 key: only the
    # key decides which root a run starts from
    built = root.weak_root(tmp_path / "elsewhere", precision="fp32", **tiny)
    built.rename(shipped / root.cache_key(precision="bf16", **tiny))
    monkeypatch.setattr(root, "resolve_precision",
                        lambda p: "fp32" if p == "auto" else p)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a root was built beside the shipped one")

    monkeypatch.setattr(root, "build_weak_root", no_build)
    assert root.weak_root(tmp_path / "cache", shipped_dir=shipped, **tiny) == \
        shipped / root.cache_key(precision="bf16", **tiny)
    with pytest.raises(AssertionError, match="beside the shipped one"):  # fp32 asked for
        root.weak_root(tmp_path / "cache", shipped_dir=shipped, precision="fp32", **tiny)


def test_a_root_on_a_coarser_grid_is_another_root_and_says_so(tmp_path: Path) -> None:
    coarse = PreprocessConfig(target_spacing_mm=3.0, input_shape=(64, 128))
    assert root.cache_key(preprocessing=coarse) != root.cache_key()
    assert root.cache_key(preprocessing=DEFAULT_PREPROCESSING) == root.cache_key()
    built = root.weak_root(tmp_path, subjects=1, steps=1, slices=4, val_subjects=0,
                           preprocessing=coarse)
    assert load_model_dir(built).manifest.preprocessing.to_config() == coarse


def test_the_project_ships_the_default_weak_root() -> None:
    """Every checkout with bf16 starts the run from the same weights (see root.py)."""
    shipped = root.SHIPPED_ROOTS / root.cache_key(precision="bf16")
    manifest = load_model_dir(shipped).manifest
    assert manifest.training is not None
    assert manifest.training["report"]["steps"] == root.DEFAULT_STEPS
    assert manifest.architecture.params["base_channels"] == 16
    assert [p.name for p in root.SHIPPED_ROOTS.iterdir()] == [shipped.name]


def test_an_unusable_cached_root_is_rebuilt(tmp_path: Path) -> None:
    tiny = {"subjects": 1, "steps": 1, "slices": 4, "val_subjects": 0}
    key = root.cache_key(**tiny)
    (tmp_path / key).mkdir()
    (tmp_path / key / "manifest.json").write_text("{")  # what a killed copy might leave
    built = root.weak_root(tmp_path, **tiny)
    assert built == tmp_path / key
    load_model_dir(built)


def test_a_send_that_finds_no_association_is_sent_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver slowed past the node's association timeout must not end the run."""
    files = write_study(make_study(site="A", seed=3, slices=2, matrix=128), tmp_path / "study")
    port = free_port()
    index = MemoryIndex()
    node = StorageServer(ae_title="DAFNE", host="127.0.0.1", port=port,
                         spool=Spool(tmp_path / "node"), index=index)
    monkeypatch.setattr(hospital, "RETRY_PAUSE_S", 1.5)
    late = threading.Timer(0.5, node.start)  # nothing listens at the first attempt
    late.start()
    sender = Hospital(HospitalPlan("hospital-a", "A"), tmp_path / "hospital", dicom_port=port,
                      http_port=free_port(), federation={},
                      settings=NodeSettings(model_dir=tmp_path, min_new_examples=1, steps=1,
                                            learning_rate=1e-3))
    try:
        sender.send(files.images, "MODALITY")
    finally:
        late.join()
        node.stop()
    assert len(index.records) == len(files.images)


def test_a_stopped_run_stops_waiting_for_its_node_at_once(tmp_path: Path) -> None:
    """Ctrl-C during a node's training run stopped nothing until the run ended (minutes)."""
    stop = threading.Event()
    waiting = Hospital(HospitalPlan("hospital-a", "A"), tmp_path / "hospital",
                       dicom_port=free_port(), http_port=free_port(), federation={},
                       settings=NodeSettings(model_dir=tmp_path, min_new_examples=1, steps=1,
                                             learning_rate=1e-3), stop=stop)
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(ArmStoppedError, match="hospital-a: stopped while waiting for its run"):
        waiting.wait_status("its run", lambda status: False, timeout=600)
    assert time.monotonic() - started < 2


def test_setting_up_a_server_in_process_keeps_the_drivers_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The run sets its servers up in the driver's process; an arm's failure logged after
    that must still reach the driver's log."""
    caplog.set_level(logging.INFO)
    set_up(tmp_path / "server", nodes=("hospital-a",))
    logging.getLogger("bench.improvement.run").warning("hospital-a arm failed")
    assert "hospital-a arm failed" in caplog.text
    assert logging.getLogger().level == logging.INFO
