"""Models: ``model show`` verifies one, ``model build-default`` rebuilds the bundled one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from dafne_node.app.cli.common import (
    EXIT_OK,
)

if TYPE_CHECKING:
    pass

def register(commands: argparse._SubParsersAction) -> None:
    """Add this module's subcommands."""
    _add_model(commands)


def _add_model(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("model", help="inspect or rebuild segmentation models",
                              description="Inspect or rebuild segmentation models.")
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="verify a model directory and print its manifest",
                              description="Verify a model (hash, manifest, tensor shapes) "
                                          "and print what it is.")
    show.add_argument("model_dir", nargs="?", type=Path, metavar="DIR",
                      help="model directory; default: the bundled leg model")
    show.set_defaults(handler=run_model_show)
    build = actions.add_parser(
        "build-default",
        help="retrain the bundled default model from site-A phantoms",
        description=(
            "Rebuild the default leg model reproducibly: generate site-A phantoms, train "
            "the 2D residual U-Net, evaluate on held-out site-A phantoms and on sites B-D, "
            "and write model.safetensors + manifest.json (with the Dice scores) to --out. "
            "Takes tens of minutes on a 2-core CPU; a progress bar shows how far it is."
        ),
        epilog="example:\n  dafne-node model build-default --out dafne_node/models/leg-default",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("--out", type=Path, metavar="DIR",
                       help="model directory to write; default: the bundled model's place")
    build.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    build.add_argument("--steps", type=int, default=None, help="optimiser steps")
    build.add_argument("--train-subjects", type=int, default=None,
                       help="number of site-A training phantoms")
    build.set_defaults(handler=run_model_build)

def run_model_show(args: argparse.Namespace) -> int:
    """Verify a model directory and describe it."""
    from dafne_node.model.manifest import default_model_dir, load_model_dir

    loaded = load_model_dir(args.model_dir or default_model_dir())
    manifest = loaded.manifest
    print(f"Model    {manifest.name}, generation {manifest.generation}")
    print(f"Path     {loaded.path}")
    print(f"Network  {manifest.architecture.id} {manifest.architecture.params}")
    print(f"Weights  sha256 {manifest.weights.sha256} (verified)")
    print("Labels   " + ", ".join(f"{spec.value}={spec.name}" for spec in manifest.labels))
    training = manifest.training or {}
    if "data" in training:
        print(f"Trained  on {training['data']}, site {training.get('train_site', '?')}")
    for site, scores in sorted(training.get("heldout_dice", {}).items()):
        per_label = ", ".join(f"{key} {value:.3f}"
                              for key, value in scores.get("per_label", {}).items())
        print(f"Dice {site}   mean {scores['mean_dice']:.3f} (held-out phantoms: {per_label})")
    return EXIT_OK

def run_model_build(args: argparse.Namespace) -> int:
    """Retrain the default model from phantoms."""
    from dafne_node.model.manifest import default_model_dir
    from dafne_node.model.train import build_default_model

    options: dict[str, int] = {"seed": args.seed}
    if args.steps is not None:
        options["steps"] = args.steps
    if args.train_subjects is not None:
        options["train_subjects"] = args.train_subjects
    manifest = build_default_model(args.out or default_model_dir(), **options)
    print(f"Built    {manifest.name}, generation {manifest.generation}")
    for key, value in (manifest.training or {}).items():
        print(f"  {key}: {value}")
    return EXIT_OK
