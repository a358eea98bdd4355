"""The weak root model a multi-hospital run starts from, built once and cached.

Dafne's continuous-learning result started from a model trained on few subjects, so every
hospital had room to improve. Starting the run from the bundled model (48 site-A subjects,
1200 steps) would leave nothing to show but site C's one jump to its inverted contrast. The
weak root is :func:`dafne_node.model.train.build_default_model` on a handful of site-A
phantom subjects and a short training:

* The defaults (3 subjects, 180 steps of 8 slices, 24 slices a study, bf16 where the CPU
  has it) took 109 s on two idle CPU cores, held-out evaluation included, and score a mean
  Dice of 0.56 (site A), 0.54 (B), 0.08 (C, inverted contrast) and 0.50 (D) on four
  held-out subjects per site (the run's evaluation seeds, 70000 + 100 x site + 0..3): room
  to improve everywhere. Dice rises steeply with the
  steps here (150: 0.36 on site A, 200: 0.81, 220: 0.87, 300: 0.92), so 180 keeps clear of
  0.85 on every site.
* Its training seeds are ``build_default_model``'s (site A, 1000 ..), which no hospital or
  evaluation set of the run uses.

:func:`weak_root` keeps one model directory per parameter set under a cache folder, named
by a hash of the parameters (and the training precision this CPU resolves "auto" to), and
builds it in a temporary sibling folder that is renamed into place only when complete, so
a killed build never leaves half a model and repeated runs and tests do not retrain.

The default root ships with the project (``bench/improvement/roots``): a build is repeatable
on one machine but not bit for bit across machines (two checkouts on the same kind of
machine built roots scoring 0.562 and 0.636 on site A), and a poisoned run is only
comparable with a clean run of another day if both started from the same weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dafne_node.model.infer import Precision, Segmenter, resolve_precision
from dafne_node.model.manifest import ModelManifest, load_model_dir
from dafne_node.model.preprocess import PreprocessConfig
from dafne_node.model.train import (
    DEFAULT_PREPROCESSING,
    TrainingExample,
    build_default_model,
    evaluate,
)

LOGGER = logging.getLogger(__name__)

__all__ = ["DEFAULT_STEPS", "SHIPPED_ROOTS", "build_weak_root", "cache_key", "starting_dice",
           "weak_root"]

DEFAULT_STEPS = 180
"""Optimiser steps of the weak root: enough to find the muscles, far from converged."""

DEFAULT_WIDTH = 16
"""The network's base channels, as in the product's model."""

SHIPPED_ROOTS = Path(__file__).with_name("roots")
"""Weak roots committed with the project, one folder per :func:`cache_key`: the defaults,
trained in bf16. A CPU without bf16 starts from the same shipped weights (see
:func:`weak_root`)."""

_KEY_VERSION = 1
"""Bumped when the build changes in a way the parameters do not show."""


def build_weak_root(
    out_dir: Path,
    *,
    subjects: int = 3,
    steps: int = DEFAULT_STEPS,
    slices: int = 24,
    width: int = DEFAULT_WIDTH,
    seed: int = 0,
    val_subjects: int = 2,
    precision: Precision = "auto",
    preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING,
    progress: bool = False,
) -> ModelManifest:
    """Train the weak root on ``subjects`` site-A phantoms and save it to ``out_dir``.

    Parameters
    ----------
    out_dir:
        Model directory to write (replaced atomically by ``save_model_dir``).
    subjects:
        Site-A training subjects (phantom seeds 1000 ..).
    steps:
        Optimiser steps of 8 slices.
    slices:
        Slices per training study.
    width:
        Channels of the network's full-resolution stage (``base_channels``; the product's
        model has 16). Each step costs about the square of it.
    seed:
        Initial weights and training randomness.
    val_subjects:
        Held-out subjects per site (seeds 0 ..) whose Dice the manifest records, sites A-D;
        0 skips that evaluation.
    precision:
        Training precision (see ``build_default_model``).
    preprocessing:
        The network's grid; the product's by default. A coarser grid (3 mm, 64 x 128: the
        same field of view) makes every step of a run, training, segmenting and scoring,
        about four times cheaper: the test suite's small run uses it.
    progress:
        Show the training progress bar.

    Returns
    -------
    ModelManifest
        The saved manifest; ``training["heldout_dice"]`` holds the recorded Dice.
    """
    if subjects < 1 or steps < 1 or slices < 1:
        raise ValueError(f"subjects, steps and slices must be positive, got {subjects}, "
                         f"{steps}, {slices}")
    return build_default_model(
        out_dir, train_subjects=subjects, val_subjects=val_subjects, steps=steps,
        slices=slices, seed=seed, eval_sites=("B", "C", "D") if val_subjects else (),
        precision=precision, progress=progress, params={"base_channels": width},
        preprocessing=preprocessing,
    )


def cache_key(
    *,
    subjects: int = 3,
    steps: int = DEFAULT_STEPS,
    slices: int = 24,
    width: int = DEFAULT_WIDTH,
    seed: int = 0,
    val_subjects: int = 2,
    precision: Precision = "auto",
    preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING,
) -> str:
    """Folder name of the weak root built with these parameters (see :func:`weak_root`).

    A hash of the parameters, with ``precision`` as this CPU resolves it. The grid enters
    the hash only when it is not the product's, so roots on the product's grid (the
    shipped one among them) keep the names they had before the grid was a parameter.
    """
    params: dict[str, object] = {
        "version": _KEY_VERSION, "subjects": subjects, "steps": steps, "slices": slices,
        "width": width, "seed": seed, "val_subjects": val_subjects,
        "precision": resolve_precision(precision)}
    if preprocessing != DEFAULT_PREPROCESSING:
        params["preprocessing"] = dataclasses.asdict(preprocessing)
    text = json.dumps(params, sort_keys=True)
    return "weak-root-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def weak_root(
    cache_dir: Path,
    *,
    subjects: int = 3,
    steps: int = DEFAULT_STEPS,
    slices: int = 24,
    width: int = DEFAULT_WIDTH,
    seed: int = 0,
    val_subjects: int = 2,
    precision: Precision = "auto",
    preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING,
    progress: bool = False,
    shipped_dir: Path = SHIPPED_ROOTS,
) -> Path:
    """The weak root's model directory for these parameters, built on first use.

    The folder is ``shipped_dir/<cache_key>`` when the project ships that root, else
    ``cache_dir/<cache_key>``. With ``precision="auto"`` a root shipped in the other
    precision counts as shipped: the run's documented results (and a later poisoned run's
    ``--clean`` comparison) start from those weights, and a CPU without bf16 that built its
    own root would start somewhere else without saying so. A cached folder that is there
    but does not load (``load_model_dir`` refuses it) is built again. The build goes to a
    temporary folder in ``cache_dir`` that is renamed into place when complete.

    Parameters are those of :func:`build_weak_root`; ``precision`` enters the key as the
    precision this CPU resolves it to, since bf16 and fp32 training give other weights.
    """
    resolved = resolve_precision(precision)
    cache_dir = Path(cache_dir)
    build: dict[str, Any] = {
        "subjects": subjects, "steps": steps, "slices": slices, "width": width, "seed": seed,
        "val_subjects": val_subjects, "preprocessing": preprocessing}
    key = cache_key(**build, precision=resolved)
    others = sorted({"bf16", "fp32"} - {resolved}) if precision == "auto" else []
    for built_in in (resolved, *others):
        shipped = Path(shipped_dir) / (key if built_in == resolved
                                       else cache_key(**build, precision=built_in))
        if shipped.is_dir():
            load_model_dir(shipped)  # a broken shipped root is a defect of the checkout
            if built_in != resolved:
                LOGGER.info("starting from the shipped weak root %s, built in %s (this CPU "
                            "trains in %s)", shipped.name, built_in, resolved)
            return shipped
    target = cache_dir / key
    if target.is_dir():
        try:
            load_model_dir(target)
        except ValueError as exc:  # ModelError is a ValueError
            LOGGER.warning("cached weak root %s is unusable (%s); building it again",
                           target, exc)
            shutil.rmtree(target)
        else:
            return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    LOGGER.info("building the weak root %s: %d site-A subjects, %d steps, %d slices, width %d, "
                "seed %d, %s", target.name, subjects, steps, slices, width, seed, resolved)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=cache_dir) as tmp:
        built = Path(tmp) / "model"
        build_weak_root(built, **build, precision=resolved, progress=progress)
        try:
            built.rename(target)
        except OSError:
            if not target.is_dir():  # not another process finishing first
                raise
    return target


def starting_dice(
    model_dir: Path,
    examples_by_site: Mapping[str, Sequence[TrainingExample]],
) -> dict[str, float]:
    """Mean Dice of the model in ``model_dir`` per site (fp32, as the run scores roots).

    Returns
    -------
    dict[str, float]
        Site -> mean over its examples of each example's mean Dice over the model's labels.
    """
    loaded = load_model_dir(model_dir)
    segmenter = Segmenter.from_loaded(loaded, precision="fp32")
    labels = loaded.manifest.to_labels()
    return {site: evaluate(segmenter, list(examples), labels).mean_dice
            for site, examples in examples_by_site.items()}
