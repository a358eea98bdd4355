"""Incremental learning: fine-tune the current model on corrections, behind a local gate.

A training window hands this module the examples that radiologists' corrections produced
since the last run (``new``), earlier local examples to replay, and the examples held out
for the gate. :func:`finetune` then

1. starts from the current model (``base_dir``) and trains on the new examples mixed with a
   sample of the replay examples (:func:`select_replay`), with augmentation, for a fixed
   number of steps; the run can be stopped at any step and continued in the next window
   from its checkpoint (:func:`dafne_node.model.train.train` does the stepping);
2. gates the result: on the held-out examples the fine-tuned model may lose at most
   ``max_dice_drop`` of mean Dice against the current model, otherwise the run is
   rejected and the reason recorded;
3. if accepted, writes the fine-tuned model directory (the node's next local model,
   ``g<generation>-local<round>``) and its weight delta against the root generation
   (:mod:`dafne_node.learning.delta`), which the sync client sends to the federation.

Why replay: with only the new corrections in the batches the network forgets what it
could do before (fine-tuned on site-C phantoms alone, the bundled model's site-A Dice fell
from 0.98 to about 0.35 within 50 steps); a few earlier examples in the mix keep most of it.

Which examples are held out is the caller's choice, made once per example with
:func:`split_holdout` so that an example never moves from training to held-out as more
arrive. No DICOM and no database here: the federation server imports this package too.

Defaults (:class:`FinetuneSettings`) come from ``bench/finetune.py`` (docs/benchmarks.md):
adapting the bundled site-A model to 10 corrected site-C series.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm import tqdm

from dafne_node.learning.delta import DeltaMetadata, compute_delta, save_delta
from dafne_node.model.checkpoint import CheckpointError, remove_checkpoint
from dafne_node.model.infer import Precision, Segmenter
from dafne_node.model.manifest import LoadedModel, load_model_dir, save_model_dir
from dafne_node.model.metrics import json_safe
from dafne_node.model.train import (
    EvaluationResult,
    TrainingExample,
    TrainingReport,
    evaluate,
    train,
)

LOGGER = logging.getLogger(__name__)

__all__ = [
    "DELTA_FILE",
    "MODEL_SUBDIR",
    "FinetuneOutcome",
    "FinetuneSettings",
    "finetune",
    "replay_count",
    "select_replay",
    "split_holdout",
]

MODEL_SUBDIR = "model"
DELTA_FILE = "delta.safetensors"
Status = Literal["accepted", "rejected", "interrupted"]
T = TypeVar("T")
H = TypeVar("H", bound=Hashable)


class FinetuneSettings(BaseModel):
    """How a node fine-tunes; the defaults are the benchmarked configuration.

    Attributes
    ----------
    steps, epochs:
        Length of a run: optimiser steps (default), or passes over the training slices
        (give ``epochs`` and leave ``steps`` out). Steps make a run's duration predictable
        whatever the number of corrections, which is what a training window needs.
    lr:
        Peak learning rate (short warm-up, cosine decay).
    batch_size:
        Slices per step.
    weight_decay:
        AdamW weight decay.
    contrast_fold:
        Probability that a training slice's contrast is folded like fat suppression
        (:func:`dafne_node.model.train.train`); 0 never.
    replay_fraction:
        Share of the training examples taken from the replay pool (0 disables replay):
        with 0.5, as many replayed examples as new ones; with 0.3 and 10 new ones, 5
        (``ceil(10 * 0.3 / 0.7)``).
    max_replay:
        Cap on the replayed examples, which bounds the run's memory.
    holdout_fraction:
        Share of a node's examples that :func:`split_holdout` holds out for the gate.
    holdout_min_examples:
        From this many examples on, at least one is held out.
    max_dice_drop:
        Largest loss of held-out mean Dice, fine-tuned versus current model, that the gate
        accepts.
    seed:
        Seeds sampling, augmentation and the replay sample; a run is repeatable.
    threads:
        Torch threads of the training process; ``None``: every core it may use.
    precision:
        ``"auto"`` trains with bf16 autocast where the CPU has native bf16, else fp32.
    compile:
        Compile the network for bf16 training (see :func:`dafne_node.model.train.train`'s
        ``compile_model``).
    checkpoint_every:
        Steps between checkpoints (a killed trainer loses at most this much work).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(default=150, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=8, ge=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    contrast_fold: float = Field(default=0.0, ge=0, le=1)
    replay_fraction: float = Field(default=0.5, ge=0, lt=1)
    max_replay: int = Field(default=10, ge=0)
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    holdout_min_examples: int = Field(default=5, ge=1)
    max_dice_drop: float = Field(default=0.02, ge=0)
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    precision: Precision = "auto"
    compile: bool = False
    checkpoint_every: int = Field(default=25, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_steps(cls, data: Any) -> Any:
        """Giving ``epochs`` without ``steps`` means a run counted in epochs."""
        if isinstance(data, dict) and data.get("epochs") is not None and "steps" not in data:
            return {**data, "steps": None}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> FinetuneSettings:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        return self


@dataclass(frozen=True)
class FinetuneOutcome:
    """What a fine-tuning run did and decided.

    Attributes
    ----------
    status:
        ``"accepted"`` (new model and delta written), ``"rejected"`` (the gate refused
        it; nothing written) or ``"interrupted"`` (stopped; continue with the same inputs
        and ``checkpoint_dir``).
    reason:
        One line for the operator: the gate's figures, why it was rejected or skipped, or
        where the run stopped.
    base_version:
        Version label of the model the run started from, e.g. ``"g1"``.
    version_label:
        Version label of the new model (``"g1-local1"``); ``None`` unless accepted.
    num_new, num_replay, num_heldout:
        Examples trained on (new, replayed) and used by the gate.
    base_heldout, tuned_heldout:
        Held-out Dice (mean, per label, per example) of the current and the fine-tuned
        model; ``None`` when the gate did not run.
    report:
        The training report (steps, loss curve, time).
    model_dir, delta_path:
        The new model directory and weight delta; ``None`` unless accepted.
    seconds:
        Wall time of this call (training, gate and writing).
    """

    status: Status
    reason: str
    base_version: str
    version_label: str | None
    num_new: int
    num_replay: int
    num_heldout: int
    base_heldout: EvaluationResult | None
    tuned_heldout: EvaluationResult | None
    report: TrainingReport
    model_dir: Path | None
    delta_path: Path | None
    seconds: float

    @property
    def accepted(self) -> bool:
        """Whether a new model and delta were written."""
        return self.status == "accepted"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary (paths as strings, NaN as ``None``) for logs and the database."""
        return json_safe(asdict(self))



def _unit_hash(example_id: Hashable) -> float:
    """A number in [0, 1) that depends only on the id (not on the process or the others)."""
    digest = hashlib.sha256(str(example_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_holdout(ids: Sequence[H], *, fraction: float = 0.2,
                  min_examples: int = 5) -> tuple[list[H], list[H]]:
    """Split example ids into training and held-out ones, deterministically and stably.

    An id is held out when a hash of its string form falls below ``fraction``, so its side
    does not depend on which other examples exist: adding examples never moves a training
    example into the held-out set, where the gate would score it on data it has learnt.
    So that the gate can run at all, once there are ``min_examples`` ids and none hashes
    below ``fraction`` the one with the smallest hash is held out (a newer id with a smaller
    hash later takes its place, and it moves to training, which is harmless).

    Parameters
    ----------
    ids:
        Stable identifiers of the examples (e.g. the correction's database id or SOP
        Instance UID); duplicates are not expected.
    fraction:
        Expected share held out, in (0, 1).
    min_examples:
        From this many ids on, at least one is held out.

    Returns
    -------
    tuple[list, list]
        ``(train, heldout)``, each in the order of ``ids``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    hashes = [_unit_hash(i) for i in ids]
    held = {k for k, h in enumerate(hashes) if h < fraction}
    if not held and ids and len(ids) >= min_examples:
        held = {int(np.argmin(hashes))}
    return ([i for k, i in enumerate(ids) if k not in held],
            [i for k, i in enumerate(ids) if k in held])


def replay_count(num_new: int, available: int, settings: FinetuneSettings) -> int:
    """How many replay examples join ``num_new`` new ones (see ``replay_fraction``)."""
    wanted = math.ceil(num_new * settings.replay_fraction / (1 - settings.replay_fraction))
    return min(available, settings.max_replay, wanted)


def select_replay(pool: Sequence[T], num_new: int, settings: FinetuneSettings) -> list[T]:
    """A seeded sample of the replay pool, sized by :func:`replay_count`, in pool order.

    It works on anything, so a caller can choose among example ids before loading any
    arrays; :func:`finetune` applies it again to the examples it gets, which keeps such a
    preselection whole (a pool of exactly :func:`replay_count` items is returned as is).
    """
    count = replay_count(num_new, len(pool), settings)
    chosen = np.random.default_rng(settings.seed).choice(len(pool), size=count, replace=False)
    return [pool[int(i)] for i in sorted(chosen)]


def _check_root(base: LoadedModel, root: LoadedModel) -> None:
    """The delta's base must be the root generation the current model descends from."""
    if root.manifest.local_round is not None:
        raise ValueError(f"root model {root.path} is a local model "
                         f"({root.manifest.version_label}), not a root generation")
    if (root.manifest.generation != base.manifest.generation
            or root.manifest.architecture != base.manifest.architecture):
        raise ValueError(f"model {base.path} ({base.manifest.version_label}) does not descend "
                         f"from root {root.path} ({root.manifest.version_label})")


def _train_resuming(base: LoadedModel, examples: Sequence[TrainingExample],
                    settings: FinetuneSettings, checkpoint_dir: Path,
                    **options: Any) -> tuple[nn.Module, TrainingReport]:
    """Train a copy of the base model, continuing the checkpoint if it is of this run.

    A checkpoint of another run (new corrections arrived, or a new generation replaced
    the base since it was written) or an unreadable one is discarded with a warning and
    the run starts afresh: it can never be continued.
    """
    def run() -> tuple[nn.Module, TrainingReport]:
        model = copy.deepcopy(base.model)
        return model, train(
            model, examples, preprocessing=base.preprocessing, steps=settings.steps,
            epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
            seed=settings.seed, weight_decay=settings.weight_decay,
            contrast_fold=settings.contrast_fold, precision=settings.precision,
            threads=settings.threads, compile_model=settings.compile,
            checkpoint_dir=checkpoint_dir, checkpoint_every=settings.checkpoint_every,
            **options)

    try:
        return run()
    except CheckpointError as exc:
        LOGGER.warning("discarding checkpoint: %s", exc)
        remove_checkpoint(checkpoint_dir)
        return run()


def _gate(base: LoadedModel, tuned: nn.Module, heldout: Sequence[TrainingExample],
          settings: FinetuneSettings, *, progress: bool
          ) -> tuple[bool, str, EvaluationResult | None, EvaluationResult | None]:
    """Compare held-out Dice of the current and the fine-tuned model."""
    if not heldout:
        return True, "gate skipped: no held-out examples", None, None
    labels = base.manifest.to_labels()
    scores = []
    for model in tqdm([base.model, tuned], desc=f"gate: {len(heldout)} held-out examples",
                      unit="model", disable=not progress, dynamic_ncols=True):
        segmenter = Segmenter(model, base.preprocessing, precision=settings.precision,
                              num_threads=settings.threads)
        scores.append(evaluate(segmenter, heldout, labels))
    before, after = scores
    if math.isnan(before.mean_dice) or math.isnan(after.mean_dice):
        return False, "gate: held-out Dice undefined (no labelled structure)", before, after
    figures = (f"held-out Dice {before.mean_dice:.3f} -> {after.mean_dice:.3f} "
               f"on {len(heldout)} examples")
    drop = before.mean_dice - after.mean_dice
    if drop > settings.max_dice_drop:
        return (False, f"gate: {figures}, a drop of {drop:.3f} > {settings.max_dice_drop}",
                before, after)
    return True, f"gate passed: {figures}", before, after


def _local_metrics(report: TrainingReport, before: EvaluationResult | None,
                   after: EvaluationResult | None, num_heldout: int) -> dict[str, Any]:
    """Aggregate figures that may leave the node with a delta (no per-example data)."""
    return {
        "heldout_examples": num_heldout,
        "heldout_dice_before": before.mean_dice if before else None,
        "heldout_dice_after": after.mean_dice if after else None,
        "heldout_dice_per_label": after.per_label if after else None,
        "steps": report.steps,
        "final_loss": report.final_loss,
    }


def _write_outputs(base: LoadedModel, root: LoadedModel, tuned: nn.Module, out_dir: Path, *,
                   local_round: int, num_samples: int, report: TrainingReport,
                   metrics: dict[str, Any], settings: FinetuneSettings
                   ) -> tuple[Path, Path, str]:
    """Write the delta, then the model directory (so a model never lacks its delta).

    Returns the model directory, the delta file and the new model's version label.
    """
    metadata = DeltaMetadata(
        model_name=root.manifest.name, architecture=root.manifest.architecture.id,
        base_generation=root.manifest.generation, base_sha256=root.manifest.weights.sha256,
        local_round=local_round, continues_round=base.manifest.local_round,
        num_samples=num_samples, num_slices=report.slices, metrics=json_safe(metrics))
    delta_path = save_delta(out_dir / DELTA_FILE,
                            compute_delta(root.model.state_dict(), tuned.state_dict()), metadata)
    summary = {
        "kind": "local fine-tuning", "base": base.manifest.version_label,
        "base_sha256": base.manifest.weights.sha256, "num_samples": num_samples,
        "metrics": metrics, "settings": settings.model_dump(),
        "report": {k: v for k, v in asdict(report).items() if k != "loss_history"},
    }
    model_dir = out_dir / MODEL_SUBDIR
    manifest = save_model_dir(
        tuned, model_dir, name=base.manifest.name, generation=root.manifest.generation,
        preprocessing=base.preprocessing, labels=base.manifest.to_labels(), training=summary,
        local_round=local_round)
    return model_dir, delta_path, manifest.version_label


def finetune(
    base_dir: Path,
    new: Sequence[TrainingExample],
    replay: Sequence[TrainingExample],
    heldout: Sequence[TrainingExample],
    settings: FinetuneSettings | None = None,
    *,
    out_dir: Path,
    checkpoint_dir: Path,
    root_dir: Path | None = None,
    local_round: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    between_steps: Callable[[], None] | None = None,
    progress: bool = True,
) -> FinetuneOutcome:
    """Fine-tune the current model on new examples, gate it, and write model and delta.

    Parameters
    ----------
    base_dir:
        The node's current model directory (a root generation or an earlier local model).
    new:
        Examples from corrections not trained on yet; at least one.
    replay:
        Earlier local training examples; a seeded sample of them (:func:`select_replay`)
        joins the new ones.
    heldout:
        Examples the gate scores both models on (never trained on; see
        :func:`split_holdout`). Empty: the gate is skipped and the run accepted.
    settings:
        Training and gate settings; defaults: ``FinetuneSettings()``.
    out_dir:
        Where an accepted run writes ``model/`` (model directory) and ``delta.safetensors``.
    checkpoint_dir:
        The run's checkpoint directory: a run stopped by ``should_stop`` continues from it
        when called again with the same inputs; it is emptied when the run is finished.
    root_dir:
        The root generation the delta is computed against; needed only when ``base_dir``
        is a local model (default: ``base_dir``).
    local_round:
        Local round of the new model; default: the base's round plus one.
    should_stop, between_steps:
        Asked / called before every training step (see :func:`dafne_node.model.train.train`).
    progress:
        Show progress bars (training, gate).

    Returns
    -------
    FinetuneOutcome
        Status, reason, held-out Dice before and after, the training report and paths.

    Raises
    ------
    ValueError
        If there is no new example, ``local_round`` is not positive, or ``root_dir`` is not
        the root of ``base_dir``.
    dafne_node.model.manifest.ModelError
        If a model directory fails verification.
    """
    started = time.perf_counter()
    settings = settings or FinetuneSettings()
    if not new:
        raise ValueError("fine-tuning needs at least one new example")
    if local_round is not None and local_round < 1:
        raise ValueError(f"local_round must be positive, got {local_round}")
    base = load_model_dir(base_dir)
    root = load_model_dir(root_dir) if root_dir is not None else base
    _check_root(base, root)
    round_ = local_round if local_round is not None else (base.manifest.local_round or 0) + 1
    chosen = select_replay(replay, len(new), settings)
    LOGGER.info("fine-tuning %s on %d new and %d replayed examples, %d held out",
                base.manifest.version_label, len(new), len(chosen), len(heldout))
    tuned, report = _train_resuming(
        base, [*new, *chosen], settings, checkpoint_dir=checkpoint_dir,
        should_stop=should_stop, between_steps=between_steps, progress=progress)

    def outcome(status: Status, reason: str, **rest: Any) -> FinetuneOutcome:
        fields: dict[str, Any] = {"version_label": None, "base_heldout": None,
                                  "tuned_heldout": None, "model_dir": None,
                                  "delta_path": None, **rest}
        LOGGER.info("fine-tuning %s: %s", status, reason)
        return FinetuneOutcome(status=status, reason=reason,
                               base_version=base.manifest.version_label, num_new=len(new),
                               num_replay=len(chosen), num_heldout=len(heldout),
                               report=report, seconds=round(time.perf_counter() - started, 1),
                               **fields)

    if report.interrupted:
        return outcome("interrupted", f"stopped at step {report.completed_steps} of "
                       f"{report.steps}; checkpoint in {checkpoint_dir}")
    passed, reason, before, after = _gate(base, tuned, heldout, settings,
                                          progress=progress)
    if not passed:
        remove_checkpoint(checkpoint_dir)
        return outcome("rejected", reason, base_heldout=before, tuned_heldout=after)
    model_dir, delta_path, version = _write_outputs(
        base, root, tuned, Path(out_dir), local_round=round_,
        num_samples=len(new) + len(chosen), report=report,
        metrics=_local_metrics(report, before, after, len(heldout)), settings=settings)
    remove_checkpoint(checkpoint_dir)
    return outcome("accepted", reason, version_label=version, base_heldout=before,
                   tuned_heldout=after, model_dir=model_dir, delta_path=delta_path)
