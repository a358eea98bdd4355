"""Write corrected DICOM-SEGs with the real writers that viewers use.

The node must recognise a radiologist's correction in whatever SEG the viewer saved,
and every viewer's writer has its own habits (RLE, FRACTIONAL, renumbered segments,
recoded segments, missing references or geometry). Testing the recogniser against SEGs
the node wrote itself would prove nothing, so each function here drives the genuine
writer:

``write_highdicom``
    highdicom, as Python tools (and this node) write SEGs, with knobs for the
    variations found in the wild (FRACTIONAL, empty frames kept, geometry per frame).
``write_dcmqi``
    dcmqi's ``itkimage2segimage``, as 3D Slicer's DICOMSegmentationExporter saves: one
    NRRD per non-empty segment with the source geometry and Slicer's metadata JSON.
``write_dcmjs``
    dcmjs' legacy Cornerstone adapter (OHIF v2, cornerstoneTools 4 viewers), run under
    Node: FRACTIONAL + RLE Lossless by default.
``write_cornerstone``
    ``@cornerstonejs/adapters``' Cornerstone3D writer as OHIF v3 saves, under Node:
    segment codes replaced by SRT "Tissue" (see :func:`ohif_segments`). The pinned
    adapters 4.19.0 carry the writer code of OHIF 3.12's 4.15.29 unchanged, with dcmjs
    0.49.4, whose fix makes native Pixel Data readable (0.48.0 wrapped it in item tags).
    OHIF 3.13 moved to adapters 5.x (dcmjs 0.52, Node >= 22.13), not reproduced here.

Every writer ties the label map of ``sources[i]`` to ``sources[i]`` in its own way
(per-frame source references and/or plane positions). Segment numbers are honoured when
they are 1..n; the JavaScript and dcmqi writers compact other numbers to 1..n in
ascending order, as the real tools do, and highdicom refuses them.

The Node packages live in ``tests/harness/seg_writers`` (pinned in its package-lock.json,
installed by ``deploy/setup.sh``).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom import Dataset, dcmread
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from dafne_node.model.manifest import default_model_dir, load_manifest

NODE_WRITERS_DIR = Path(__file__).with_name("seg_writers")
"""The npm project holding the JavaScript writers and their pinned packages."""

DCMQI_TIMEOUT_S = 120
NODE_TIMEOUT_S = 120

ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")
OHIF_TISSUE = ("T-D0050", "SRT", "Tissue")
"""What OHIF writes as both category and type of every segment it saves."""

PALETTE: tuple[tuple[int, int, int], ...] = (
    (221, 84, 84), (77, 228, 121), (166, 70, 235), (189, 180, 116),
    (109, 182, 150), (92, 23, 160), (249, 194, 83), (23, 131, 191),
)
"""Display colours by position in the segment list; the recogniser must ignore them."""


class WriterUnavailableError(RuntimeError):
    """A writer's program (Node, its npm packages, dcmqi) is not installed here."""


@dataclass(frozen=True)
class SegmentSpec:
    """One segment to write: which label-map value it covers and how it is described.

    Attributes
    ----------
    value:
        Value in the label map given to the writer.
    label:
        Segment Label.
    type_code:
        Segmented Property Type as ``(value, scheme, meaning)``,
        e.g. ``("181702007", "SCT", "Soleus muscle")``.
    category_code:
        Segmented Property Category; "Anatomical Structure" unless said otherwise.
    number:
        Segment Number to write; defaults to the position in the list (1-based).
    """

    value: int
    label: str
    type_code: tuple[str, str, str]
    category_code: tuple[str, str, str] = ANATOMICAL_STRUCTURE
    number: int | None = None


def leg_segments() -> list[SegmentSpec]:
    """The six muscles of the bundled model, coded as its manifest codes them.

    Values and numbers are the manifest's label values (1..6), the same values
    ``dafne_node.phantom`` writes in ``study.labels``.
    """
    labels = load_manifest(default_model_dir()).to_labels()
    return [
        SegmentSpec(value=label.value, label=label.name, type_code=_triple(label.type_code),
                    category_code=_triple(label.category_code), number=label.value)
        for label in labels
    ]


def ohif_segments(segments: Sequence[SegmentSpec]) -> list[SegmentSpec]:
    """``segments`` as OHIF v3 saves them: only the label survives, coded SRT "Tissue".

    OHIF's segmentation service keeps a segment's label and colour, not its codes, and its
    SEG export writes category and type "T-D0050" (SRT) "Tissue" for every segment.
    """
    return [replace(spec, type_code=OHIF_TISSUE, category_code=OHIF_TISSUE) for spec in segments]


def write_highdicom(
    sources: Sequence[Path],
    label_map: np.ndarray,
    segments: Sequence[SegmentSpec],
    out: Path,
    *,
    fractional: bool = False,
    series_instance_uid: str | None = None,
    omit_empty_frames: bool = True,
    geometry_per_frame_only: bool = False,
    algorithm_type: str = "MANUAL",
) -> Path:
    """Write a SEG with highdicom; each frame references its source image.

    Parameters
    ----------
    sources:
        Single-frame source images; ``label_map[i]`` belongs to ``sources[i]``.
    label_map:
        ``(len(sources), rows, cols)`` integers; values not in ``segments`` are refused.
    segments:
        What to write; their numbers must be 1..n (highdicom's rule for BINARY and
        FRACTIONAL).
    out:
        Output file.
    fractional:
        FRACTIONAL (PROBABILITY, maximum 255, pixels 0 or 255) instead of BINARY.
    series_instance_uid:
        Save into this series (a viewer saving a new version); a new series otherwise.
    omit_empty_frames:
        False keeps a frame for every source and segment, empty or not.
    geometry_per_frame_only:
        Move Pixel Measures and Plane Orientation from the Shared Functional Groups into
        every Per-Frame item, as some writers do.
    algorithm_type:
        Segment Algorithm Type; AUTOMATIC and SEMIAUTOMATIC name the harness as algorithm.

    Raises
    ------
    ValueError
        If the label map does not fit the sources or segments, or highdicom refuses.
    """
    numbered = _numbered(label_map, segments, len(sources))
    datasets = [dcmread(path, stop_before_pixels=True) for path in sources]
    algorithm = None
    if algorithm_type != "MANUAL":
        algorithm = hd.AlgorithmIdentificationSequence(
            name="Dafne harness", version="1", family=Code("113037", "DCM", "Pixel Classifier"),
        )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label,
            segmented_property_category=Code(*spec.category_code),
            segmented_property_type=Code(*spec.type_code),
            algorithm_type=algorithm_type,
            algorithm_identification=algorithm,
        )
        for number, spec in numbered
    ]
    masks = np.stack([label_map == spec.value for _, spec in numbered], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=masks.astype(np.float32) if fractional else masks,
        segmentation_type="FRACTIONAL" if fractional else "BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Dafne harness",
        manufacturer_model_name="highdicom",
        software_versions=hd.__version__,
        device_serial_number="0",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=omit_empty_frames,
    )
    if geometry_per_frame_only:
        _move_geometry_per_frame(seg)
    seg.save_as(out)
    return out


def write_dcmqi(
    sources: Sequence[Path],
    label_map: np.ndarray,
    segments: Sequence[SegmentSpec],
    out: Path,
) -> Path:
    """Write a SEG as 3D Slicer saves one: dcmqi's ``itkimage2segimage``.

    Slicer's DICOMSegmentationExporter writes each non-empty segment as its own NRRD
    (label 1, the reference volume's geometry) and a metadata JSON; empty segments are
    skipped (Slicer's "skip empty segments and proceed"). dcmqi numbers segments 1..n in
    file order, so files go in segment-number order. dcmqi finds each frame's source
    image by geometry, so the NRRDs carry the sources' positions.

    Raises
    ------
    WriterUnavailableError
        If ``itkimage2segimage`` is not installed.
    RuntimeError
        If dcmqi fails; the message holds its output.
    """
    tool = dcmqi_tool("itkimage2segimage")
    numbered = _numbered(label_map, segments, len(sources))
    datasets = [dcmread(path, stop_before_pixels=True) for path in sources]
    order, geometry = _volume_geometry(datasets)
    with tempfile.TemporaryDirectory(prefix="dcmqi-") as tmp:
        images: list[str] = []
        attributes: list[list[dict[str, object]]] = []
        for position, (_, spec) in enumerate(numbered):
            mask = (label_map == spec.value)[order]
            if not mask.any():
                continue
            image = sitk.GetImageFromArray(mask.astype(np.uint8))
            geometry(image)
            path = Path(tmp) / f"segment{position}.nrrd"
            sitk.WriteImage(image, str(path), useCompression=True)
            images.append(str(path))
            attributes.append([_slicer_segment(spec, PALETTE[position % len(PALETTE)])])
        if not images:
            raise ValueError("every segment is empty; Slicer refuses to export that")
        metadata = Path(tmp) / "seg_meta.json"
        metadata.write_text(json.dumps(_slicer_metadata(datasets[0], attributes), indent=2))
        _run([
            tool, "--inputImageList", ",".join(images),
            "--inputDICOMList", ",".join(str(path) for path in sources),
            "--inputMetadata", str(metadata), "--outputDICOM", str(out),
        ], DCMQI_TIMEOUT_S)
    return out


def write_dcmjs(
    sources: Sequence[Path],
    label_map: np.ndarray,
    segments: Sequence[SegmentSpec],
    out: Path,
    *,
    rle_encode: bool = True,
    series_instance_uid: str | None = None,
) -> Path:
    """Write a SEG with dcmjs' legacy adapter (``write_dcmjs.mjs``), as OHIF v2 saved.

    The segment codes are written as given: cornerstoneTools 4 kept the codes of a SEG
    it had loaded (pass :func:`ohif_segments` for segments drawn from scratch).
    ``rle_encode`` is the adapter's default: FRACTIONAL, RLE Lossless, Maximum
    Fractional Value 255 but pixel values 1; False writes BINARY, bit-packed.

    Raises
    ------
    WriterUnavailableError
        If Node or the npm packages are missing.
    RuntimeError
        If the writer fails; the message holds its output.
    """
    return _run_node_writer("write_dcmjs.mjs", sources, label_map, segments, out,
                            series_instance_uid=series_instance_uid, rle_encode=rle_encode)


def write_cornerstone(
    sources: Sequence[Path],
    label_map: np.ndarray,
    segments: Sequence[SegmentSpec],
    out: Path,
    *,
    series_instance_uid: str | None = None,
) -> Path:
    """Write a SEG as OHIF v3 saves one (``write_cornerstone.mjs``).

    Only each segment's label is used: OHIF writes SRT "Tissue" codes and MANUAL
    whatever the segment was (its "OHIF Brush" algorithm name is dropped by dcmjs for
    MANUAL); :func:`ohif_segments` gives what the file then says.

    Raises
    ------
    WriterUnavailableError
        If Node or the npm packages are missing.
    RuntimeError
        If the writer fails; the message holds its output.
    """
    return _run_node_writer("write_cornerstone.mjs", sources, label_map, segments, out,
                            series_instance_uid=series_instance_uid)


def node_writers_missing() -> str | None:
    """Why the Node writers cannot run here, or None when they can."""
    if shutil.which("node") is None:
        return "node is not installed"
    installed = NODE_WRITERS_DIR / "node_modules"
    if not all((installed / name).is_dir() for name in ("dcmjs", "@cornerstonejs/adapters")):
        return f"npm packages missing in {NODE_WRITERS_DIR} (run bash deploy/setup.sh)"
    return None


def dcmqi_tool(name: str) -> str:
    """Path of a dcmqi program; the pip package puts them beside the venv's python.

    Raises
    ------
    WriterUnavailableError
        If dcmqi is not installed.
    """
    tool = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(tool).exists():
        raise WriterUnavailableError(f"{name} (pip package dcmqi) is not installed")
    return tool


def _run_node_writer(
    script: str,
    sources: Sequence[Path],
    label_map: np.ndarray,
    segments: Sequence[SegmentSpec],
    out: Path,
    **options: object,
) -> Path:
    """Hand the job to a Node writer; its label map holds segment numbers.

    In Cornerstone a label-map value is the segment index the viewer shows, and the
    writers number segments by ascending index, so the value written is the number.
    """
    missing = node_writers_missing()
    if missing:
        raise WriterUnavailableError(missing)
    numbered = _numbered(label_map, segments, len(sources))
    lookup = np.zeros(256, dtype=np.uint8)
    for number, spec in numbered:
        lookup[spec.value] = number
    with tempfile.TemporaryDirectory(prefix="segjob-") as tmp:
        raw = Path(tmp) / "labels.u8"
        lookup[label_map].tofile(raw)
        job = {
            "sources": [str(Path(path).resolve()) for path in sources],
            "labelmap": {"path": str(raw), "shape": list(label_map.shape)},
            "segments": [
                {"index": number, "label": spec.label,
                 "color": list(PALETTE[position % len(PALETTE)]),
                 "category": _code_json(spec.category_code), "type": _code_json(spec.type_code)}
                for position, (number, spec) in enumerate(numbered)
            ],
            "output": str(Path(out).resolve()),
            **options,
        }
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        _run(["node", str(NODE_WRITERS_DIR / script), str(job_file)], NODE_TIMEOUT_S)
    return out


def _numbered(
    label_map: np.ndarray, segments: Sequence[SegmentSpec], frames: int,
) -> list[tuple[int, SegmentSpec]]:
    """Check the label map against sources and segments; (number, spec) by number."""
    if label_map.ndim != 3 or label_map.shape[0] != frames:
        raise ValueError(f"label map shape {label_map.shape} does not fit {frames} sources")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label map must hold integers, not {label_map.dtype}")
    values = [spec.value for spec in segments]
    if len(set(values)) != len(values) or not all(1 <= v <= 255 for v in values):
        raise ValueError(f"segment values must be distinct and in 1..255: {values}")
    numbers = [spec.number or position for position, spec in enumerate(segments, start=1)]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"segment numbers must be distinct: {numbers}")
    unknown = set(np.unique(label_map).tolist()) - {0, *values}
    if unknown:
        raise ValueError(f"label map holds values {sorted(unknown)} no segment describes")
    return sorted(zip(numbers, segments, strict=True), key=lambda pair: pair[0])


def _volume_geometry(
    datasets: Sequence[Dataset],
) -> tuple[np.ndarray, Callable[[sitk.Image], None]]:
    """Slice order along the normal and a function giving an ITK image that geometry.

    ITK volumes run along the slice normal (row x column cosines), so the slices are
    sorted by their position on it; spacing between slices is their mean distance.
    """
    orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    gap = float(np.ptp(distances) / (len(datasets) - 1)) if len(datasets) > 1 else 1.0
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)

    def apply(image: sitk.Image) -> None:
        image.SetOrigin(tuple(positions[order[0]]))
        image.SetSpacing((column_spacing, row_spacing, gap))
        image.SetDirection(tuple(np.column_stack([row, column, normal]).ravel()))

    return order, apply


def _slicer_segment(spec: SegmentSpec, color: tuple[int, int, int]) -> dict[str, object]:
    """A segmentAttributes item as Slicer's exporter writes it (label 1 per file)."""
    return {
        "labelID": 1,
        "SegmentLabel": spec.label,
        "SegmentDescription": spec.category_code[2],
        "SegmentAlgorithmType": "MANUAL",
        "recommendedDisplayRGBValue": list(color),
        "SegmentedPropertyCategoryCodeSequence": _dcmqi_code(spec.category_code),
        "SegmentedPropertyTypeCodeSequence": _dcmqi_code(spec.type_code),
    }


def _slicer_metadata(
    source: Dataset, attributes: list[list[dict[str, object]]],
) -> dict[str, object]:
    """The series attributes Slicer's exporter fills in, defaults included."""
    series_number = source.get("SeriesNumber")
    return {
        "SeriesNumber": "100" if series_number in (None, "") else str(int(series_number) + 100),
        "InstanceNumber": "1",
        "SeriesDescription": "Segmentation",
        "ContentCreatorName": "Slicer",
        "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1",
        "ClinicalTrialCoordinatingCenterName": "QIICR",
        "segmentAttributes": attributes,
    }


def _move_geometry_per_frame(seg: Dataset) -> None:
    """Move Pixel Measures and Plane Orientation from Shared into every Per-Frame item."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    moved = [kw for kw in ("PixelMeasuresSequence", "PlaneOrientationSequence") if kw in shared]
    for item in seg.PerFrameFunctionalGroupsSequence:
        for keyword in moved:
            setattr(item, keyword, copy.deepcopy(shared[keyword].value))
    for keyword in moved:
        delattr(shared, keyword)


def _run(command: list[str], timeout: int) -> None:
    """Run a writer; a failure carries its output, which names the real cause."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-4000:]
        program = " ".join(Path(part).name for part in command[:2])
        raise RuntimeError(f"{program} failed ({done.returncode}):\n{output}")


def _triple(code: Code) -> tuple[str, str, str]:
    return (code.value, code.scheme_designator, code.meaning)


def _code_json(code: tuple[str, str, str]) -> dict[str, str]:
    return {"value": code[0], "scheme": code[1], "meaning": code[2]}


def _dcmqi_code(code: tuple[str, str, str]) -> dict[str, str]:
    return {"CodeValue": code[0], "CodingSchemeDesignator": code[1], "CodeMeaning": code[2]}
