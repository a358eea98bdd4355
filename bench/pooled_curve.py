"""How many training steps does a site need? The weak root trained centrally, no federation.

The multi-hospital run (``bench/federated_improvement.py``) ends with site C, the Dixon water
protocol, below the other sites. Is that the federation (averaging site C's update with three
others that pull the other way) or the network (16 base channels learning an inverted contrast
slowly)? This script takes the federation away: it trains the weak root in one process on
the studies of ``--sites`` pooled (8 studies a site of 24 slices, the run's protocols), with
the nodes' settings (``train``: learning rate ``--lr``, contrast folding 0.3, batch 8, bf16
where the CPU has it), and scores the run's evaluation set (``--eval-per-site`` subjects per
site, in fp32 as the run scores) after every ``--chunk`` steps. Each chunk is one ``train``
call with its own warm-up and cosine decay, as each of a node's runs is.

    .venv/bin/python bench/pooled_curve.py --sites C --chunks 4 --chunk 150     # site C alone
    .venv/bin/python bench/pooled_curve.py --sites ABCD --chunks 4 --chunk 300  # all pooled

Prints one Markdown row per chunk: the mean Dice per site, and site C's Dice per muscle.
A run costs ``chunks * chunk`` training steps (0.6-2 s each, by CPU) plus the scoring.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.federated_round import SITES, example  # noqa: E402 - path set up above
from bench.improvement.root import weak_root  # noqa: E402
from bench.improvement.run import STUDY_SEED, RunConfig, evaluation_set  # noqa: E402
from dafne_node.model.infer import Segmenter  # noqa: E402
from dafne_node.model.manifest import LoadedModel, load_model_dir  # noqa: E402
from dafne_node.model.train import TrainingExample, evaluate, train  # noqa: E402

STUDIES_PER_SITE = 8


def scores(loaded: LoadedModel, datasets: dict[str, list[tuple[str, TrainingExample]]]
           ) -> tuple[dict[str, float], dict[str, float]]:
    """Mean Dice per site, and site C's Dice per muscle (empty if C is not scored)."""
    segmenter = Segmenter(loaded.model, loaded.preprocessing, manifest=loaded.manifest,
                          precision="fp32")
    means, muscles = {}, {}
    for site, cases in datasets.items():
        result = evaluate(segmenter, [case for _, case in cases], loaded.manifest.to_labels())
        means[site] = result.mean_dice
        if site == "C":
            muscles = result.per_label
    return means, muscles


def row(label: str, means: dict[str, float], muscles: dict[str, float]) -> str:
    cells = [f"{means[site]:.3f}" for site in sorted(means)]
    mean = sum(means.values()) / len(means)
    return (f"| {label} | " + " | ".join(cells) + f" | {mean:.3f} | "
            + ", ".join(f"{name} {value:.2f}" for name, value in muscles.items()) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="C", help="the sites whose studies are pooled "
                        "for training, e.g. C or ABCD (default: C)")
    parser.add_argument("--chunks", type=int, default=4, help="training runs, scored after each")
    parser.add_argument("--chunk", type=int, default=150, help="steps of each training run")
    parser.add_argument("--lr", type=float, default=RunConfig.learning_rate,
                        help="peak learning rate (default: the run's nodes', %(default)g)")
    parser.add_argument("--eval-per-site", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as a node's "
                        "trainer (default: 1)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "weak-root")
    args = parser.parse_args(argv)
    if not args.sites or set(args.sites) - set(SITES):
        parser.error(f"--sites takes letters of {SITES}, got {args.sites!r}")

    torch.set_num_threads(args.threads)
    loaded = load_model_dir(weak_root(args.cache))
    studies = [example(site, STUDY_SEED + 1000 * SITES.index(site) + i, 24)
               for site in tqdm(args.sites, desc="studies", unit="site")
               for i in range(STUDIES_PER_SITE)]
    datasets = evaluation_set(RunConfig(eval_per_site=args.eval_per_site))
    print(f"\nsites {args.sites} pooled ({len(studies)} studies), lr {args.lr:g}, "
          f"{args.eval_per_site} evaluation subjects per site\n")
    print("| steps | " + " | ".join(sorted(datasets)) + " | mean | site C per muscle |")
    print("|---:|" + "---:|" * (len(datasets) + 1) + "---|")
    print(row("0 (weak root)", *scores(loaded, datasets)), flush=True)
    for chunk in range(1, args.chunks + 1):
        started = time.perf_counter()
        train(loaded.model, studies, preprocessing=loaded.preprocessing, steps=args.chunk,
              lr=args.lr, seed=chunk - 1, contrast_fold=RunConfig.contrast_fold,
              threads=args.threads, precision="auto", progress=False)
        seconds = time.perf_counter() - started
        print(row(f"{chunk * args.chunk} ({seconds:.0f} s)", *scores(loaded, datasets)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
