"""Benchmark: one incremental fine-tuning run adapting the bundled model to site C.

The bundled model (generation 1, trained on site-A phantoms) segments site C's Dixon-water-like
images with a Dice near 0.03. This script plays one training window of a site-C node:

- corrections: the ground truth of ``--new`` site-C phantom subjects (seeds 2000, 2001, ...),
  i.e. radiologists' perfect corrections;
- replay pool: ``--replay-pool`` site-A subjects (seeds 3000, ...), standing in for earlier
  training data, so that adapting to C does not cost site A;
- held-out (the gate's examples): site-C subjects with seeds 0 .. ``--heldout`` - 1, which
  no training set uses;

runs ``dafne_node.learning.finetune.finetune`` from the bundled model with the default
``FinetuneSettings`` (or the options given) and reports its time, the held-out site-C Dice
before and after, and the site-A Dice (seeds 0 .. ``--site-a`` - 1) of both models.

    .venv/bin/python bench/finetune.py                       # the documented run
    .venv/bin/python bench/finetune.py --new 3 --steps 30    # a short run

Prints a Markdown table for docs/benchmarks.md; ``--json OUT`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from dafne_node.learning.finetune import FinetuneSettings, finetune
from dafne_node.model.infer import Segmenter, available_cores
from dafne_node.model.manifest import default_model_dir, load_model_dir
from dafne_node.model.train import TrainingExample, evaluate
from dafne_node.phantom import make_study


def phantoms(site: str, seeds: Sequence[int], slices: int, what: str) -> list[TrainingExample]:
    out = []
    for seed in tqdm(seeds, desc=f"{what}: site {site} phantoms", unit="study"):
        study = make_study(site=site, seed=seed, slices=slices)
        out.append(TrainingExample(study.pixels, study.labels, tuple(study.pixel_spacing)))
    return out


def site_a_dice(model_dirs: dict[str, Path], examples: list[TrainingExample],
                threads: int | None) -> dict[str, float]:
    out = {}
    for name, path in tqdm(model_dirs.items(), desc="site-A evaluation", unit="model"):
        loaded = load_model_dir(path)
        segmenter = Segmenter.from_loaded(loaded, num_threads=threads)
        out[name] = evaluate(segmenter, examples, loaded.manifest.to_labels()).mean_dice
    return out


def main() -> None:
    defaults = FinetuneSettings()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=10, help="corrected site-C series")
    parser.add_argument("--slices", type=int, default=40, help="slices per series")
    parser.add_argument("--heldout", type=int, default=10, help="held-out site-C subjects")
    parser.add_argument("--replay-pool", type=int, default=10, help="site-A replay subjects")
    parser.add_argument("--site-a", type=int, default=10, help="site-A evaluation subjects")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--replay-fraction", type=float, default=defaults.replay_fraction)
    parser.add_argument("--max-replay", type=int, default=defaults.max_replay)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                        default=defaults.precision)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    settings = defaults.model_copy(update={
        "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
        "replay_fraction": args.replay_fraction, "max_replay": args.max_replay,
        "threads": args.threads, "precision": args.precision, "seed": args.seed})
    new = phantoms("C", range(2000, 2000 + args.new), args.slices, "corrections")
    replay = phantoms("A", range(3000, 3000 + args.replay_pool), args.slices, "replay pool")
    heldout = phantoms("C", range(args.heldout), args.slices, "held out")
    site_a = phantoms("A", range(args.site_a), args.slices, "site-A evaluation")

    work = Path(tempfile.mkdtemp(prefix="dafne-finetune-"))
    started = time.perf_counter()
    outcome = finetune(default_model_dir(), new, replay, heldout, settings,
                       out_dir=work / "out", checkpoint_dir=work / "checkpoint")
    seconds = time.perf_counter() - started
    if outcome.model_dir is None:
        raise SystemExit(f"run not accepted: {outcome.status}: {outcome.reason}")
    a_dice = site_a_dice({"before": default_model_dir(), "after": outcome.model_dir},
                         site_a, args.threads)

    c_before, c_after = outcome.base_heldout, outcome.tuned_heldout
    assert c_before is not None and c_after is not None
    figures = {
        "settings": settings.model_dump(), "new": args.new, "slices": args.slices,
        "replayed": outcome.num_replay, "heldout": args.heldout,
        "threads": outcome.report.threads or available_cores(),
        "training_seconds": outcome.report.seconds, "finetune_seconds": round(seconds, 1),
        "site_c_before": c_before.mean_dice, "site_c_after": c_after.mean_dice,
        "site_c_after_per_label": c_after.per_label,
        "site_a_before": a_dice["before"], "site_a_after": a_dice["after"],
        "final_loss": outcome.report.final_loss,
    }
    print(f"\n{args.new} corrected {args.slices}-slice site-C series + {outcome.num_replay} "
          f"replayed site-A, {settings.steps} steps of {settings.batch_size}, lr {settings.lr}, "
          f"{outcome.report.precision}, {figures['threads']} threads\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| training (s) | {outcome.report.seconds:.0f} |")
    print(f"| whole run: training + gate + writing model and delta (s) | {seconds:.0f} |")
    print(f"| held-out site-C Dice ({args.heldout} subjects), before -> after | "
          f"{c_before.mean_dice:.3f} -> **{c_after.mean_dice:.3f}** |")
    print(f"| site-A Dice ({args.site_a} subjects), before -> after | "
          f"{a_dice['before']:.3f} -> {a_dice['after']:.3f} |")
    print("| site-C Dice per label after | "
          + ", ".join(f"{k} {v:.3f}" for k, v in c_after.per_label.items()) + " |")
    print(f"\ngate: {outcome.reason}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
