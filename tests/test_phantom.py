"""The synthetic lower-leg MRI phantom: anatomy, site contrasts, determinism and DICOM output."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dafne_node.model.labels import LEG_MUSCLES, label_by_key
from dafne_node.phantom import SITES, PhantomStudy, Tissue, make_study, write_images

ALL_LABELS = {label.value for label in LEG_MUSCLES}
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


def _mid(study: PhantomStudy) -> int:
    return study.pixels.shape[0] // 2


def _label_area(study: PhantomStudy, index: int, key: str) -> int:
    return int((study.labels[index] == label_by_key(key).value).sum())


@pytest.fixture(scope="module")
def full_a() -> PhantomStudy:
    return make_study("A", 5)


@pytest.fixture(scope="module")
def small_studies() -> dict[str, PhantomStudy]:
    return {site: make_study(site, 11, slices=5) for site in SITES}


def test_same_seed_gives_identical_study() -> None:
    first, second = make_study("B", 3, slices=6), make_study("B", 3, slices=6)
    np.testing.assert_array_equal(first.pixels, second.pixels)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.sop_instance_uids == second.sop_instance_uids
    assert first.series_instance_uid == second.series_instance_uid
    assert first.patient_birth_date == second.patient_birth_date


def test_study_identity_does_not_depend_on_rendering() -> None:
    small, large = make_study("A", 8, slices=2, matrix=64), make_study("A", 8, slices=7)
    assert small.study_instance_uid == large.study_instance_uid
    assert small.frame_of_reference_uid == large.frame_of_reference_uid
    assert (small.study_date, small.study_time) == (large.study_date, large.study_time)
    assert small.patient_birth_date == large.patient_birth_date
    assert small.series_instance_uid != large.series_instance_uid
    assert set(small.sop_instance_uids).isdisjoint(large.sop_instance_uids)


def test_different_seeds_give_different_subjects() -> None:
    first, second = make_study("A", 3, slices=6), make_study("A", 4, slices=6)
    assert not np.array_equal(first.labels, second.labels)
    assert np.mean(first.pixels != second.pixels) > 0.5
    assert first.study_instance_uid != second.study_instance_uid
    assert set(first.sop_instance_uids).isdisjoint(second.sop_instance_uids)
    assert first.patient_id != second.patient_id


def test_sites_scan_their_own_patients_unless_a_subject_is_shared() -> None:
    a, b = make_study("A", 7, slices=3), make_study("C", 7, slices=3)
    assert a.study_instance_uid != b.study_instance_uid
    assert a.subject.legs[0].profiles["radius"][0] != b.subject.legs[0].profiles["radius"][0]
    shared_a = make_study("A", 7, slices=3, subject_seed=99)
    shared_c = make_study("C", 7, slices=3, subject_seed=99)
    np.testing.assert_array_equal(shared_a.subject.legs[1].profiles["radius"],
                                  shared_c.subject.legs[1].profiles["radius"])
    assert shared_a.subject.age == shared_c.subject.age


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("site", list(SITES))
def test_every_label_in_each_leg_at_mid_calf(site: str, seed: int) -> None:
    study = make_study(site, seed, slices=3)
    mid = study.labels[_mid(study)]
    half = mid.shape[1] // 2
    assert set(np.unique(mid[:, :half])) >= ALL_LABELS, "right leg (image left)"
    assert set(np.unique(mid[:, half:])) >= ALL_LABELS, "left leg (image right)"


def test_labels_only_on_muscle(small_studies: dict[str, PhantomStudy]) -> None:
    for study in small_studies.values():
        labelled = study.labels > 0
        assert set(np.unique(study.labels)) <= {0, *ALL_LABELS}
        assert np.all(study.tissues[labelled] == Tissue.MUSCLE)
        # Most muscle is labelled; the rest is the deep posterior group Dafne does not segment.
        muscle = study.tissues == Tissue.MUSCLE
        assert 0.6 < labelled.sum() / muscle.sum() < 0.95
        assert np.all(study.labels[study.tissues == Tissue.FAT] == 0)
        assert np.all(study.labels[study.tissues == Tissue.CORTEX] == 0)


def test_different_muscles_never_touch_without_a_septum(full_a: PhantomStudy) -> None:
    labels = full_a.labels
    for a, b in ((labels[:, :, :-1], labels[:, :, 1:]), (labels[:, :-1, :], labels[:, 1:, :])):
        touching = (a > 0) & (b > 0) & (a != b)
        assert not touching.any()
    assert (full_a.tissues == Tissue.SEPTUM).sum() > 1000


def test_muscles_change_along_the_leg(full_a: PhantomStudy) -> None:
    distal, mid, proximal = 0, _mid(full_a), full_a.pixels.shape[0] - 1
    assert full_a.levels[distal] > full_a.levels[proximal]  # ascending z goes towards the knee
    gm = [_label_area(full_a, k, "gastrocnemius_medial") for k in (distal, mid, proximal)]
    assert gm[0] < 0.3 * gm[2], "medial gastrocnemius tapers towards the ankle"
    soleus = [_label_area(full_a, k, "soleus") for k in (distal, mid, proximal)]
    assert soleus[1] > soleus[2], "soleus grows from the knee towards mid-calf"
    body = (full_a.tissues > 0).sum(axis=(1, 2))
    assert body[distal] < body[mid], "the leg is thinner above the ankle"


def test_legs_are_mirror_images_with_their_own_variation(full_a: PhantomStudy) -> None:
    mid = full_a.labels[_mid(full_a)]
    half = mid.shape[1] // 2
    right, left = mid[:, :half], mid[:, half:]
    for label in LEG_MUSCLES:
        a, b = (right == label.value).sum(), (left == label.value).sum()
        assert a != b
        assert 0.4 < a / b < 2.5, label.key
    # Mirrored: the tibia (anteromedial) lies nearer the midline than the fibula in both legs.
    cortex = full_a.tissues[_mid(full_a)] == Tissue.CORTEX
    cols = np.arange(cortex.shape[1])
    for side in (cols < half, cols >= half):
        bone_cols = cols[side & cortex.any(axis=0)]
        assert bone_cols.size > 0
    tibialis = label_by_key("tibialis_anterior").value
    peroneus = label_by_key("peroneus").value
    r_ta, r_pe = (np.nonzero(right == v)[1].mean() for v in (tibialis, peroneus))
    l_ta, l_pe = (np.nonzero(left == v)[1].mean() + half for v in (tibialis, peroneus))
    assert r_pe < r_ta, "right leg: peroneus lateral, i.e. towards image left"
    assert l_pe > l_ta, "left leg: peroneus lateral, i.e. towards image right"


def test_site_contrasts_differ(small_studies: dict[str, PhantomStudy]) -> None:
    def muscle_to_fat(study: PhantomStudy) -> float:
        muscle = study.pixels[study.tissues == Tissue.MUSCLE].mean()
        fat = study.pixels[study.tissues == Tissue.FAT].mean()
        return float(muscle / fat)

    ratio = {site: muscle_to_fat(study) for site, study in small_studies.items()}
    assert ratio["A"] < 0.6, "T1: fat brighter than muscle"
    assert ratio["C"] > 2.0, "Dixon water: muscle brighter than fat"
    assert ratio["B"] < ratio["A"], "T2: muscle darker still"
    assert ratio["D"] > ratio["A"], "fat-infiltrated muscle is brighter on T1"

    def background_noise(study: PhantomStudy) -> float:
        air = study.pixels[study.tissues == Tissue.AIR].mean()
        return float(air / study.pixels[study.tissues == Tissue.FAT].mean())

    assert background_noise(small_studies["D"]) > 1.5 * background_noise(small_studies["A"])


def test_matrix_overrides_site_default_and_keeps_fov() -> None:
    study = make_study("C", 2, slices=4, matrix=128)
    assert study.pixels.shape == (4, 128, 128) == study.labels.shape
    assert study.pixels.dtype == np.uint16 and study.labels.dtype == np.uint8
    assert study.pixel_spacing == pytest.approx((400 / 128, 400 / 128))
    default = make_study("C", 2, slices=4)
    assert default.pixels.shape[1:] == (SITES["C"].matrix, SITES["C"].matrix)
    assert int(study.pixels.max()) < 2 ** SITES["C"].bits_stored


def test_study_arrays_are_read_only(small_studies: dict[str, PhantomStudy]) -> None:
    with pytest.raises(ValueError, match="read-only"):
        small_studies["A"].labels[0, 0, 0] = 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"site": "E"}, "site"),
        ({"site": "a"}, "site"),
        ({"slices": 0}, "slices"),
        ({"matrix": 8}, "matrix"),
        ({"matrix": 64.5}, "matrix"),
        ({"seed": -1}, "seed"),
        ({"subject_seed": -3}, "subject_seed"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} "):
        make_study(**kwargs)  # type: ignore[arg-type]


def test_written_series_matches_the_study(tmp_path: Path) -> None:
    study = make_study("D", 4, slices=5)
    paths = write_images(study, tmp_path)
    assert paths == sorted(paths)
    assert all(path.parent == tmp_path / "images" for path in paths)
    datasets = [pydicom.dcmread(path) for path in paths]
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    np.testing.assert_allclose(np.diff(z), study.spacing_between_slices)
    for index, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
        assert ds.InstanceNumber == index + 1
        assert ds.SOPInstanceUID == study.sop_instance_uids[index]
        assert ds.SeriesInstanceUID == study.series_instance_uid
        assert ds.FrameOfReferenceUID == study.frame_of_reference_uid
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(study.pixel_spacing)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SpacingBetweenSlices) == study.spacing_between_slices
        assert float(ds.SliceThickness) == study.slice_thickness
        assert float(ds.SliceLocation) == pytest.approx(z[index])
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   study.image_positions[index], atol=1e-5)
        np.testing.assert_array_equal(ds.pixel_array, study.pixels[index])
    first = datasets[0]
    assert first.PatientID == "DAFNE-D-0004" and str(first.PatientName) == "Phantom^D0004"
    assert first.Modality == "MR" and first.BodyPartExamined == "LEG"
    assert first.Manufacturer == SITES["D"].manufacturer
    assert float(first.EchoTime) == SITES["D"].echo_time_ms
    assert first.BitsAllocated == 16 and first.BitsStored == SITES["D"].bits_stored
    # The first row of pixels lies at Image Position; columns run along +x (patient left).
    x0 = float(first.ImagePositionPatient[0])
    assert x0 == pytest.approx(-SITES["D"].fov_mm / 2 + study.pixel_spacing[1] / 2)


def test_writing_refuses_to_mix_series(tmp_path: Path) -> None:
    write_images(make_study("A", 1, slices=3, matrix=32), tmp_path)
    assert len(write_images(make_study("A", 1, slices=3, matrix=32), tmp_path)) == 3
    with pytest.raises(FileExistsError, match="other DICOM files"):
        write_images(make_study("A", 1, slices=2, matrix=32), tmp_path)


@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("site", list(SITES))
def test_dciodvfy_finds_no_errors(site: str, tmp_path: Path) -> None:
    study = make_study(site, 1, slices=2, matrix=64)
    path = write_images(study, tmp_path)[1]
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60,
                            check=False)
    report = result.stdout + result.stderr
    assert "MRImage" in report, report  # it recognised the IOD it checked
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report


def test_site_figure(tmp_path: Path) -> None:
    from dafne_node.phantom.figure import write_site_figure  # noqa: PLC0415 (needs matplotlib)

    path = write_site_figure(tmp_path / "docs" / "phantoms.png", seed=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 50_000
