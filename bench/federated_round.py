"""Federated rounds from the weak root (or any model), in one process: which settings help?

The multi-hospital run (``bench/federated_improvement.py``) takes most of an hour; this
script measures in minutes what its generations do, in one process and with the same parts:
the weak root, the node's fine-tuning (``finetune``, as a node runs it on its corrections),
the upload codec (top-k int8, density 0.2), FedBuff with a server learning rate, and the
gate's scoring (``score_state``). For each ``LR:STEPS[:FOLD]`` given, each of the four
hospitals (sites A-D, 3 studies of 24 slices each, the run's study seeds) fine-tunes the root
on its own studies (``FOLD``: the probability of contrast folding, ``contrast_fold``); the
script then scores, on one validation subject per site (seeds 90000 + site, 16 slices;
never trained on):

* site A's, site C's and site D's update alone (does a node's own update help its own
  site? from a weak root a fresh optimiser can first make things worse);
* the FedBuff candidate of all four at each server learning rate.

With ``--rounds R`` the candidate of the first server learning rate becomes the next round's
model and every site fine-tunes it on new studies, R rounds in all (the gate is not
applied: every candidate is kept), which shows whether the sites keep pulling together.

    .venv/bin/python bench/federated_round.py 1e-3:20 3e-4:20 5e-4:30     # ~3 min per pair
    .venv/bin/python bench/federated_round.py 5e-4:30 5e-4:30:0.3 --server-lr 2 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.improvement.root import weak_root  # noqa: E402 - path set up above
from dafne_node.learning.delta import DeltaMetadata  # noqa: E402
from dafne_node.learning.finetune import FinetuneSettings, finetune  # noqa: E402
from dafne_node.learning.update import decode_update, encode_update  # noqa: E402
from dafne_node.model.manifest import LoadedModel, load_model_dir, save_model_dir  # noqa: E402
from dafne_node.model.train import TrainingExample  # noqa: E402
from dafne_node.phantom import make_study  # noqa: E402
from federation.gate import Scores, score_state  # noqa: E402
from federation.strategies import BufferedUpdate, FedBuff  # noqa: E402
from federation.validation import ValidationCase  # noqa: E402

SITES = "ABCD"
STUDY_SEED = 20_000
VALIDATION_SEED = 90_000


def example(site: str, seed: int, slices: int) -> TrainingExample:
    study = make_study(site=site, seed=seed, slices=slices)
    return TrainingExample(study.pixels, study.labels, tuple(study.pixel_spacing))


@dataclass(frozen=True)
class Variant:
    """One node configuration to compare."""

    lr: float
    steps: int
    contrast_fold: float = 0.0

    def __str__(self) -> str:
        fold = f", contrast fold {self.contrast_fold:g}" if self.contrast_fold else ""
        return f"node lr {self.lr:g}, {self.steps} steps{fold}"


def variant(text: str) -> Variant:
    """``LR:STEPS[:FOLD]`` -> Variant."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError(text)
        return Variant(float(parts[0]), int(parts[1]),
                       float(parts[2]) if len(parts) == 3 else 0.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LR:STEPS[:FOLD] such as 5e-4:30 or 5e-4:30:0.3, got {text!r}") from None


def upload(root: LoadedModel, tuned_dir: Path, state: Mapping[str, torch.Tensor],
           density: float) -> dict[str, torch.Tensor]:
    """The delta as the server decodes it after the node's encoding."""
    tuned = load_model_dir(tuned_dir).model.state_dict()
    delta = {name: tuned[name].float() - state[name] for name in state}
    meta = DeltaMetadata(model_name=root.manifest.name,
                         architecture=root.manifest.architecture.id, base_generation=1,
                         base_sha256=root.manifest.weights.sha256, num_samples=3, num_slices=0)
    return decode_update(encode_update(delta, meta, density=density).payload).tensors


def describe(name: str, scores: Scores) -> str:
    sites = ", ".join(f"{site} {value:.3f}" for site, value in scores.sites.items())
    return f"| {name} | {scores.mean:.3f} | {sites} |"


def train_round(model_dir: Path, base: LoadedModel, state: Mapping[str, torch.Tensor],
                data: Mapping[str, list[TrainingExample]], chosen: Variant, *, threads: int,
                density: float, work: Path, fold_sites: str = SITES
                ) -> dict[str, dict[str, torch.Tensor]]:
    """Every site's decoded upload after fine-tuning ``model_dir`` (loaded as ``base``, its
    fp32 weights ``state``) on its own studies; only ``fold_sites`` fold contrast."""
    deltas = {}
    for site in SITES:
        settings = FinetuneSettings(
            steps=chosen.steps, lr=chosen.lr, threads=threads,
            contrast_fold=chosen.contrast_fold if site in fold_sites else 0.0)
        outcome = finetune(model_dir, data[site], [], [], settings, out_dir=work / site,
                           checkpoint_dir=work / f"{site}-checkpoint", progress=False)
        if outcome.model_dir is None:
            raise SystemExit(f"site {site}: run not accepted: {outcome.reason}")
        deltas[site] = upload(base, outcome.model_dir, state, density)
    return deltas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=variant, metavar="LR:STEPS[:FOLD]",
                        help="the nodes' learning rate, steps and contrast-fold probability, "
                             "e.g. 5e-4:30 or 5e-4:30:0.3")
    parser.add_argument("--server-lr", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds, each from the last round's candidate (first server lr)")
    parser.add_argument("--density", type=float, default=0.2, help="top-k density of uploads")
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "weak-root")
    parser.add_argument("--fold-sites", default=SITES, metavar="SITES",
                        help="the sites whose nodes fold contrast (FOLD of each variant), "
                        "e.g. ABD: site C's fat-suppressed images are left as they are")
    parser.add_argument("--start", type=Path, default=None, metavar="MODEL_DIR",
                        help="start from this model instead of the weak root, e.g. a late "
                        "generation a run left in its --work folder "
                        "(WORK/ours/hospital-b/node/models/dafne-leg-g9)")
    args = parser.parse_args(argv)

    root_dir = args.start or weak_root(args.cache)
    root = load_model_dir(root_dir)
    validation = [ValidationCase(site=site, name=f"{site}0",
                                 example=example(site, VALIDATION_SEED + i, 16))
                  for i, site in enumerate(SITES)]
    print("| model | mean Dice | per site |\n|---|---:|---|")
    print(describe("start" if args.start else "weak root",
                   score_state(root.manifest, root.model.state_dict(), validation)), flush=True)
    for chosen in args.variants:
        with tempfile.TemporaryDirectory(prefix="dafne-round-") as tmp:
            model_dir = root_dir
            for round_ in range(1, args.rounds + 1):
                data = {site: [example(site, STUDY_SEED + 100 * (round_ - 1) + 10 * j + i, 24)
                               for i in range(args.studies)] for j, site in enumerate(SITES)}
                started = time.perf_counter()
                work = Path(tmp) / f"round-{round_}"
                base = load_model_dir(model_dir)
                state = {name: value.float() for name, value in base.model.state_dict().items()}
                deltas = train_round(model_dir, base, state, data, chosen, threads=args.threads,
                                     density=args.density, work=work,
                                     fold_sites=args.fold_sites)
                print(f"| *{chosen}, round {round_} ({time.perf_counter() - started:.0f} s of "
                      "training)* | | |", flush=True)
                for site in ("A", "C", "D"):
                    alone = FedBuff().aggregate(
                        state, 1, [BufferedUpdate(site, deltas[site], 1, 3)],
                        lambda n, state=state: state)
                    print(describe(f"site {site}'s update alone",
                                   score_state(base.manifest, alone.state, validation)),
                          flush=True)
                updates = [BufferedUpdate(site, delta, 1, 3) for site, delta in deltas.items()]
                candidates = []
                for server_lr in args.server_lr:
                    candidate = FedBuff(server_lr=server_lr).aggregate(
                        state, 1, updates, lambda n, state=state: state)
                    candidates.append(candidate.state)
                    print(describe(f"FedBuff of all four, server lr {server_lr:g}",
                                   score_state(base.manifest, candidate.state, validation)),
                          flush=True)
                base.model.load_state_dict(candidates[0])
                model_dir = work / "candidate"
                save_model_dir(base.model, model_dir, name=base.manifest.name,
                               generation=round_ + 1,
                               preprocessing=base.manifest.preprocessing.to_config(),
                               labels=base.manifest.to_labels())
    return 0


if __name__ == "__main__":
    sys.exit(main())
