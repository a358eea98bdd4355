"""One hospital's update alone: what fine-tuning a generation on one site does to every site.

The multi-hospital run (``bench/federated_improvement.py``) shows what the averaged updates
do; this script isolates one of them. It fine-tunes a model directory (the weak root, or any
generation a run left in its ``--work`` folder under
``<arm>/<hospital>/node/models/dafne-leg-g<N>``) on new studies of one site, the way that
site's node would (``finetune``, no replay), once per contrast-fold probability, and scores
each result on the evaluation subjects of every site (the run's seeds: 70000 + 100·site + i,
24 slices), so a setting's gain on its own site can be weighed against its cost elsewhere.

    .venv/bin/python bench/site_update.py WORK/ours/hospital-c/node/models/dafne-leg-g7 \\
        --site C --steps 90 --fold 0 0.3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.federated_round import SITES, example  # noqa: E402 - path set up above
from bench.improvement.run import RunConfig, evaluation_set  # noqa: E402
from dafne_node.learning.finetune import FinetuneSettings, finetune  # noqa: E402
from dafne_node.model.manifest import load_model_dir  # noqa: E402
from federation.gate import Scores, score_state  # noqa: E402
from federation.validation import ValidationCase  # noqa: E402

STUDY_SEED = 55_000


def row(name: str, scores: Scores) -> str:
    return f"| {name} | " + " | ".join(f"{scores.sites[site]:.3f}" for site in SITES) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="the model to fine-tune")
    parser.add_argument("--site", choices=list(SITES), default="C",
                        help="whose studies the node trains on")
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--fold", type=float, nargs="+", default=[0.0, 0.3],
                        help="contrast-fold probabilities to compare")
    parser.add_argument("--eval-per-site", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    evaluation = [ValidationCase(site=site, name=name, example=case)
                  for site, cases in evaluation_set(RunConfig(eval_per_site=args.eval_per_site))
                  .items() for name, case in cases]
    data = [example(args.site, STUDY_SEED + i, 24) for i in range(args.studies)]
    base = load_model_dir(args.model_dir)
    print(f"| site {args.site}'s node, {args.steps} steps at lr {args.lr:g} | "
          + " | ".join(SITES) + " |\n|---|" + "---:|" * len(SITES))
    print(row(f"before ({base.manifest.version_label})",
              score_state(base.manifest, base.model.state_dict(), evaluation,
                          threads=args.threads)), flush=True)
    for fold in args.fold:
        with tempfile.TemporaryDirectory(prefix="dafne-site-update-") as tmp:
            started = time.perf_counter()
            settings = FinetuneSettings(steps=args.steps, lr=args.lr, threads=args.threads,
                                        contrast_fold=fold)
            outcome = finetune(args.model_dir, data, [], [], settings, out_dir=Path(tmp) / "run",
                               checkpoint_dir=Path(tmp) / "checkpoint", progress=True)
            if outcome.model_dir is None:
                raise SystemExit(f"the run was not accepted: {outcome.reason}")
            tuned = load_model_dir(outcome.model_dir)
            scores = score_state(tuned.manifest, tuned.model.state_dict(), evaluation,
                                 threads=args.threads)
            print(row(f"contrast fold {fold:g} ({time.perf_counter() - started:.0f} s)",
                      scores), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
