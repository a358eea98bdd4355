"""Benchmark: a 40-slice 256x256 phantom series from files on disk to a SEG on disk.

Measures, in one run on the same files:
- the whole ``dafne-node segment`` process (cold: Python start, imports, model load),
- warm in-process runs with bf16 and with fp32 inference (slices/s of the model alone),
- SEG encoding time.

    .venv/bin/python bench/segment.py --repeats 5

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from dafne_node.dicom.files import save_dataset_atomically
from dafne_node.dicom.series import find_files, read_series
from dafne_node.inference.segmenter import SeriesSegmenter
from dafne_node.phantom import make_study
from dafne_node.phantom.study import write_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="warm runs per precision")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--matrix", type=int, default=256)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dafne-bench-"))
    study = make_study(site="A", seed=11, slices=args.slices, matrix=args.matrix)
    files = write_study(study, work / "leg")
    images = files.images[0].parent

    cli = str(Path(sys.executable).with_name("dafne-node"))
    cold: list[float] = []
    for _ in tqdm(range(3), desc="cold CLI runs"):
        started = time.perf_counter()
        subprocess.run([cli, "segment", str(images), "--out", str(work / "cli.dcm")],
                       check=True, capture_output=True)
        cold.append(time.perf_counter() - started)

    rows: dict[str, dict[str, float]] = {}
    for precision in ("bf16", "fp32"):
        segmenter = SeriesSegmenter(precision=precision)
        totals, inference, encode = [], [], []
        for _ in tqdm(range(args.repeats + 1), desc=f"warm {precision} runs"):
            started = time.perf_counter()
            series, _ = read_series(find_files([images]))
            result = segmenter.segment_series(series[0])
            save_dataset_atomically(result.seg, work / f"{precision}.dcm")
            totals.append(time.perf_counter() - started)
            inference.append(result.timings["segment"])
            encode.append(result.timings["encode"])
        # The first run warms caches (oneDNN kernels, highdicom's standard tables).
        rows[precision] = {
            "total": statistics.median(totals[1:]),
            "slices_per_s": args.slices / statistics.median(inference[1:]),
            "encode": statistics.median(encode[1:]),
        }

    bf16, fp32 = rows["bf16"], rows["fp32"]
    print(f"\n{args.slices} slices of {args.matrix}x{args.matrix}, site-A phantom, "
          f"{args.repeats} warm runs (median)\n")
    print("| measure | bf16 | fp32 |")
    print("|---|---|---|")
    print(f"| files -> SEG on disk, warm (s) | {bf16['total']:.2f} | {fp32['total']:.2f} |")
    print(f"| model inference (slices/s) | {bf16['slices_per_s']:.1f} | "
          f"{fp32['slices_per_s']:.1f} |")
    print(f"| SEG encode (s) | {bf16['encode']:.2f} | {fp32['encode']:.2f} |")
    print(f"\nbf16 / fp32 inference speed: {bf16['slices_per_s'] / fp32['slices_per_s']:.2f}x")
    print(f"`dafne-node segment` whole process, cold (s): median {statistics.median(cold):.2f} "
          f"(runs: {', '.join(f'{t:.2f}' for t in cold)})")


if __name__ == "__main__":
    main()
