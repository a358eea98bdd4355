"""``dafne-node segment`` as a user runs it: phantoms, real-world files, refusals."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dafne_node.app.cli import main
from dafne_node.dicom.seg_decode import SourceFrame, decode_segmentation
from dafne_node.dicom.series import load_volume, read_series
from dafne_node.model.labels import LEG_MUSCLES
from dafne_node.model.metrics import dice_per_label, mean_dice
from tests.conftest import WrittenStudy


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} is not installed"
    return Path(spec.origin).parent


PYDICOM_FILES = _package_dir("pydicom") / "data" / "test_files"
PYDICOM_DATA_FILES = _package_dir("data_store") / "data"  # the pydicom-data package


def real_world_files() -> list[Path]:
    """pydicom's bundled test files and pydicom-data: every transfer syntax and oddity."""
    return sorted(PYDICOM_FILES.glob("*.dcm")) + sorted(PYDICOM_DATA_FILES.glob("*.dcm"))


@pytest.fixture(scope="module")
def segmented(heldout_study: WrittenStudy, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("seg") / "dafne.seg.dcm"
    result = subprocess.run(
        [str(Path(".venv/bin/dafne-node").resolve()), "segment", str(heldout_study.folder),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout + result.stderr


def test_segment_reaches_dice_090_on_heldout_site_a(
    segmented: tuple[Path, str], heldout_study: WrittenStudy
) -> None:
    out, _ = segmented
    frames = [SourceFrame(uid) for uid in heldout_study.study.sop_instance_uids]
    decoded = decode_segmentation(dcmread(out), LEG_MUSCLES, frames)
    scores = dice_per_label(decoded.label_map, heldout_study.study.labels,
                            [label.value for label in LEG_MUSCLES])
    assert mean_dice(scores) >= 0.90, scores


def test_segment_tells_the_user_what_it_did(segmented: tuple[Path, str],
                                            heldout_study: WrittenStudy) -> None:
    out, output = segmented
    assert heldout_study.study.series_instance_uid in output
    assert "Dafne leg, generation 1" in output
    for label in LEG_MUSCLES:
        line = next(line for line in output.splitlines() if line.strip().startswith(label.name))
        assert float(line.split()[-2]) > 0, line
    assert str(out) in output
    assert "Time" in output
    # The phantom folder also holds truth.seg.dcm: skipped, with the reason.
    assert "truth.seg.dcm" in output and "not a MR image series" in output


def test_segment_writes_the_seg_users_expect(segmented: tuple[Path, str],
                                             heldout_study: WrittenStudy) -> None:
    out, _ = segmented
    seg = dcmread(out)
    assert seg.StudyInstanceUID == heldout_study.study.study_instance_uid
    assert seg.SeriesDescription == "Dafne leg g1"
    assert seg.SegmentationType == "BINARY"
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "Dafne leg"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    result = subprocess.run(["/usr/bin/dciodvfy", str(out)], capture_output=True, text=True,
                            check=False, timeout=60)
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if line.startswith("Error")]
    assert errors == []


def test_segmenting_twice_gives_the_same_instance(segmented: tuple[Path, str],
                                                  heldout_study: WrittenStudy,
                                                  tmp_path: Path) -> None:
    """Deterministic UIDs: PACS stores a re-run once instead of piling up copies."""
    first, _ = segmented
    again = tmp_path / "again.dcm"
    assert main(["segment", str(heldout_study.files.images[0].parent), "--out", str(again)]) == 0
    assert dcmread(again).SOPInstanceUID == dcmread(first).SOPInstanceUID


def test_compare_reports_dice(segmented: tuple[Path, str], heldout_study: WrittenStudy,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = segmented
    assert main(["compare", str(out), str(heldout_study.files.truth)]) == 0
    mean_line = capsys.readouterr().out.splitlines()[-1]
    assert mean_line.startswith("Mean") and float(mean_line.split()[-1]) >= 0.90


def test_compare_names_the_labels_of_the_model_it_is_given(
    segmented: tuple[Path, str], heldout_study: WrittenStudy, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Labels come from a model's manifest, not from a list in the code."""
    import json  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from dafne_node.model.manifest import default_model_dir  # noqa: PLC0415

    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["labels"] = [label for label in manifest["labels"] if label["key"] == "soleus"]
    manifest["labels"][0]["name"] = "Musculus soleus"
    (model / "manifest.json").write_text(json.dumps(manifest))
    out, _ = segmented
    assert main(["compare", str(out), str(heldout_study.files.truth), "--json",
                 "--model-dir", str(model)]) == 0
    assert list(json.loads(capsys.readouterr().out)["dice"]) == ["soleus"]
    assert main(["compare", str(out), str(heldout_study.files.truth),
                 "--model-dir", str(model)]) == 0
    assert capsys.readouterr().out.startswith("Musculus soleus")


@pytest.mark.parametrize("path", real_world_files(), ids=lambda p: p.name)
def test_real_world_file_segments_or_is_refused_in_one_line(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.dcm"
    code = main(["segment", str(path), "--out", str(out)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code == 0:
        seg = dcmread(out)
        assert seg.Modality == "SEG"
        assert "Volumes" in captured.out
    else:
        assert code == 1, captured.err
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, lines
        assert str(path) in lines[0]
        assert not out.exists()
        assert list(tmp_path.iterdir()) == []


def test_decodable_mr_formats_are_read(tmp_path: Path) -> None:
    """RLE, JPEG-LS, JPEG 2000 and big endian MR decode to the same pixels as the original."""
    variants = ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]
    reference_series, _ = read_series([PYDICOM_FILES / "MR_small.dcm"])
    reference = load_volume(reference_series[0]).pixels
    for name in variants:
        series, refusals = read_series([PYDICOM_FILES / name])
        assert refusals == []
        np.testing.assert_array_equal(load_volume(series[0]).pixels, reference, err_msg=name)


def test_missing_input_is_one_clear_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["segment", str(tmp_path / "nope"), "--out", str(tmp_path / "x.dcm")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [f"dafne-node segment: {tmp_path / 'nope'}: no such file or folder"]


def test_model_show_verifies_and_reports_dice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "show"]) == 0
    out = capsys.readouterr().out
    assert "Dafne leg, generation 1" in out and "(verified)" in out
    dice_a = next(line for line in out.splitlines() if line.startswith("Dice A"))
    assert float(dice_a.split()[3]) >= 0.90
    assert all(f"Dice {site}" in out for site in "BCD")
