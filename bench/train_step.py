"""Benchmark: one training step of the product's network, uncompiled against compiled.

Trains the architecture of the bundled model (``unet2d-res``; ``--widths`` sets its base
channels) for ``--steps`` steps through :func:`dafne_node.model.train.train`, exactly as a
node's trainer does (augmentation, loss, AdamW, the trainer's one thread), once as written
and once with ``compile_model=True``, in the same process and on the same site-A phantoms.
A step's time comes from ``train``'s per-step callback: the first step of a compiled run
holds the compile (reported apart), the median of the others is the step.

    .venv/bin/python bench/train_step.py                      # widths 16 and 24, 30 steps
    .venv/bin/python bench/train_step.py --widths 16 --steps 10

Compiling applies to bf16 training; on a CPU that trains in fp32 the script says so and
stops. Inductor caches compiled kernels on disk: the first compile of a width takes 30-60 s,
a later process finds it in seconds (run the script twice to see both).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from dafne_node.model.architectures import build_model, default_params
from dafne_node.model.infer import resolve_precision
from dafne_node.model.train import DEFAULT_PREPROCESSING, TrainingExample, train
from dafne_node.phantom import make_study


def step_times(width: int, examples: Sequence[TrainingExample], steps: int,
               compiled: bool, threads: int) -> list[float]:
    """Seconds of each step of one run from fixed initial weights."""
    torch.manual_seed(0)
    model = build_model("unet2d-res", {**default_params("unet2d-res"), "base_channels": width})
    stamps = [time.perf_counter()]
    train(model, examples, preprocessing=DEFAULT_PREPROCESSING, steps=steps, lr=5e-4,
          precision="bf16", threads=threads, progress=False, compile_model=compiled,
          callback=lambda _step, _loss: stamps.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(stamps)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="16,24",
                        help="base channels to measure, comma-separated (default: 16,24)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run (default: 30)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, as a node's trainer (default: 1)")
    args = parser.parse_args(argv)
    if resolve_precision("auto") != "bf16":
        print("this CPU trains in fp32, where the node does not compile: nothing to compare")
        return 1
    examples = [TrainingExample(s.pixels, s.labels, tuple(s.pixel_spacing))
                for s in (make_study(site="A", seed=seed, slices=24) for seed in (1000, 1001))]
    print("| base channels | uncompiled step | compiled step | speed-up | first compiled "
          "step (compile) |\n|---|---|---|---|---|")
    runs = [(int(w), compiled) for w in args.widths.split(",") for compiled in (False, True)]
    times: dict[tuple[int, bool], list[float]] = {}
    for width, compiled in tqdm(runs, desc="runs", unit="run"):
        times[width, compiled] = step_times(width, examples, args.steps, compiled, args.threads)
    for width in dict.fromkeys(w for w, _ in runs):
        plain = statistics.median(times[width, False][1:])
        fast = statistics.median(times[width, True][1:])
        print(f"| {width} | {plain:.3f} s | {fast:.3f} s | {plain / fast:.2f}x | "
              f"{times[width, True][0]:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
