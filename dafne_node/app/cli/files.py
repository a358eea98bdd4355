"""Working on files: ``segment``, ``compare`` and ``phantom``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dafne_node.app.cli.common import (
    EXIT_OK,
    UserError,
)

if TYPE_CHECKING:
    pass

SITES = ("A", "B", "C", "D")


def register(commands: argparse._SubParsersAction) -> None:
    """Add this module's subcommands."""
    _add_segment(commands)
    _add_compare(commands)
    _add_phantom(commands)


def _add_segment(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "segment",
        help="segment a DICOM series from files and write a DICOM-SEG",
        description=(
            "Read DICOM files (folders are searched recursively), pick the MR series the "
            "model applies to (the largest, unless --series names one), segment every slice "
            "and write one DICOM-SEG in the same study. Prints the series used, the model, "
            "the volume of each muscle in mL and the time taken. Files that cannot be used "
            "are listed with the reason; if no series can be segmented nothing is written "
            "and the exit code is 1."
        ),
        epilog=(
            "examples:\n"
            "  dafne-node phantom --out /tmp/leg && dafne-node segment /tmp/leg/images "
            "--out /tmp/leg/dafne.seg.dcm\n"
            "  dafne-node segment export/ --series 1.2.826.0.1.3680043.8.498.1 --out seg.dcm"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                     help="DICOM files or folders")
    sub.add_argument("--out", required=True, type=Path, metavar="FILE.dcm",
                     help="where to write the DICOM-SEG (written atomically)")
    sub.add_argument("--model", type=Path, metavar="DIR",
                     help="model directory (manifest.json + model.safetensors); "
                          "default: the bundled leg model")
    sub.add_argument("--series", metavar="UID", help="Series Instance UID to segment")
    sub.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                     help="arithmetic for inference; auto = bf16 where the CPU supports it")
    sub.set_defaults(handler=run_segment)

def _add_compare(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "compare",
        help="Dice overlap per muscle between two DICOM-SEGs of the same images",
        description=(
            "Compare two DICOM-SEGs over the same source images, e.g. the node's result and "
            "a radiologist's correction or a phantom's truth. Segments are matched by their "
            "SNOMED CT type code, so renumbered or renamed segments compare correctly."
        ),
        epilog="example:\n  dafne-node compare /tmp/leg/dafne.seg.dcm /tmp/leg/truth.seg.dcm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("seg", type=Path, metavar="SEG", help="the segmentation to judge")
    sub.add_argument("reference", type=Path, metavar="REFERENCE", help="the reference SEG")
    sub.add_argument("--json", action="store_true", help="print the scores as JSON")
    sub.add_argument("--model-dir", type=Path, metavar="DIR",
                     help="the model whose labels are compared (default: the bundled model)")
    sub.set_defaults(handler=run_compare)

def _add_phantom(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "phantom",
        help="write a synthetic lower-leg MR study with its ground-truth SEG",
        description=(
            "Write one synthetic lower-leg MR study (both calves, the six muscles Dafne "
            "segments, tibia, fibula and fat) as DICOM: DIR/images/ holds one MR image per "
            "slice and DIR/truth.seg.dcm the ground truth. Sites are scanner protocols: "
            "A T1-weighted, B T2-weighted, C Dixon water-like at another resolution, D T1 "
            "with strong bias field, noise and fat infiltration. The same seed always "
            "gives the same subject."
        ),
        epilog="example:\n  dafne-node phantom --out /tmp/leg-b7 --site B --seed 7",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    sub.add_argument("--site", default="A", choices=SITES, help="scanner protocol (default A)")
    sub.add_argument("--seed", default=0, type=int, help="subject seed (default 0)")
    sub.add_argument("--slices", default=40, type=int, help="number of slices (default 40)")
    sub.add_argument("--matrix", type=int,
                     help="in-plane matrix (rows = columns); default: the site's")
    sub.set_defaults(handler=run_phantom)

def run_segment(args: argparse.Namespace) -> int:
    """Segment the chosen series of ``args.inputs`` into ``args.out``."""
    from dafne_node.dicom.files import save_dataset_atomically
    from dafne_node.dicom.series import choose_series, find_files, read_series
    from dafne_node.inference.segmenter import MODEL_MODALITY, SeriesSegmenter, structure_table

    started = time.perf_counter()
    files = find_files(args.inputs)
    if not files:
        raise UserError("no files found in " + ", ".join(str(p) for p in args.inputs))
    series, refusals = read_series(files)
    chosen, notes = choose_series(series, MODEL_MODALITY, args.series)
    skipped = [str(refusal) for refusal in refusals] + notes
    if chosen is None:
        for line in skipped[:-1]:
            print(f"skipped: {line}", file=sys.stderr)
        raise UserError(skipped[-1] if skipped else "no image series to segment")
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)

    segmenter = SeriesSegmenter(args.model, precision=args.precision)
    result = segmenter.segment_series(chosen)
    written_at = time.perf_counter()
    save_dataset_atomically(result.seg, args.out)
    total = time.perf_counter() - started
    first = chosen.first
    print(f"Series   {chosen.description} {first.SeriesInstanceUID}")
    print(f"Study    {first.get('StudyInstanceUID', '?')} patient {first.get('PatientID', '?')}")
    print(f"Model    {result.model_name}, generation {result.generation} ({result.precision})")
    print("Volumes")
    for line in structure_table(result.structures):
        print(f"  {line}")
    size_mb = args.out.stat().st_size / 1e6
    print(f"Wrote    {args.out} (DICOM-SEG, {len(result.structures)} segments, {size_mb:.1f} MB)")
    timings = result.timings
    print(
        f"Time     {total:.2f} s (read {timings['read']:.2f}, segment "
        f"{timings['segment']:.2f}, encode {timings['encode']:.2f}, "
        f"write {time.perf_counter() - written_at:.2f})"
    )
    return EXIT_OK

def run_compare(args: argparse.Namespace) -> int:
    """Print per-muscle Dice between two SEGs."""
    from pydicom import dcmread

    from dafne_node.dicom.seg_decode import decode_segmentation
    from dafne_node.model.manifest import ModelError, default_model_dir, load_manifest
    from dafne_node.model.metrics import dice_per_label, mean_dice

    try:
        labels = load_manifest(args.model_dir or default_model_dir()).to_labels()
    except ModelError as exc:
        raise UserError(str(exc)) from exc
    reference = decode_segmentation(dcmread(args.reference), labels)
    candidate = decode_segmentation(dcmread(args.seg), labels,
                                    reference.source_frames)
    scores = dice_per_label(candidate.label_map, reference.label_map,
                            [label.value for label in labels])
    mean = mean_dice(scores)
    if args.json:
        named = {label.key: scores[label.value] for label in labels}
        print(json.dumps({"dice": named, "mean_dice": mean}, indent=2))
        return EXIT_OK
    width = max(len(label.name) for label in labels)
    for label in labels:
        print(f"{label.name:<{width}}  Dice {scores[label.value]:.3f}")
    print(f"{'Mean':<{width}}  Dice {mean:.3f}")
    return EXIT_OK

def run_phantom(args: argparse.Namespace) -> int:
    """Write a synthetic study and its truth SEG."""
    from dafne_node.phantom import make_study
    from dafne_node.phantom.study import write_study

    try:
        study = make_study(site=args.site, seed=args.seed, slices=args.slices,
                           matrix=args.matrix)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    paths = write_study(study, args.out)
    print(f"Wrote    {len(paths.images)} MR images to {paths.images[0].parent}")
    print(f"Truth    {paths.truth}")
    print(f"Patient  {study.patient_id}, site {study.site} ({study.protocol.series_description})")
    return EXIT_OK
