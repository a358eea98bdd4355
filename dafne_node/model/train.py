"""Training: the default model from phantoms, and fine-tuning on radiologists' corrections.

One loop serves both: :func:`train` takes a model and a list of labelled volumes and runs a
fixed number of optimiser steps on randomly drawn, augmented slices. Building the default
model (:func:`build_default_model`) is that loop on site-A phantoms followed by an
evaluation on held-out phantoms of every site; incremental training on a node is the same
loop on a few corrected series, started from the current generation with a smaller learning
rate and fewer steps.

Choices and why:

* Loss = cross-entropy + soft Dice over the muscles. Cross-entropy gives smooth gradients
  from the first step; the Dice term keeps small muscles (extensor digitorum longus) from
  being drowned by background and is the metric the validation gate compares.
* Augmentation is cheap and anatomical: left-right flips (both legs are in the field of
  view, and the labels do not distinguish sides), small rotations/scalings/shifts (patient
  positioning), and intensity changes (gamma, contrast, bias field, noise) for scanner and
  protocol differences between hospitals. Optionally (``contrast_fold``) a slice's
  intensities are folded: dark stays dark, mid-grey becomes brightest and the brightest
  tissue dark, which is roughly what fat suppression (a Dixon water image) does to a T1
  image. Nodes of hospitals that scan with and without fat suppression then train towards
  one model instead of pulling it towards their own contrast.
* AdamW with a short warm-up and cosine decay: robust without tuning, for fine-tuning and
  for training from scratch alike.
* Training runs in NCHW with bf16 autocast where the CPU supports it; see :func:`train`.
* Everything random is drawn from one seeded generator, so a run is repeatable (bit-for-bit
  on the same machine and thread count).
* A node trains only inside its training windows and gives way to segmentation, so a run can
  stop at any step boundary (``should_stop``), pause (``between_steps``) and continue later
  from a checkpoint (:mod:`dafne_node.model.checkpoint`: weights, AdamW state, step, random
  state) to exactly the weights an uninterrupted run would reach.

The bundled model: ``build_default_model(default_model_dir())`` - 48 site-A phantom
subjects (seeds 1000-1047), 1200 steps of 8 slices - took 20 minutes on 2 shared CPU cores
and reached a mean Dice of 0.977 on 20 held-out site-A subjects (seeds 0-19); the manifest's
``training`` entry records the numbers of every site.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from dafne_node.model.architectures import build_model, count_parameters
from dafne_node.model.checkpoint import (
    CheckpointError,
    TrainingState,
    load_checkpoint,
    save_checkpoint,
)
from dafne_node.model.infer import Precision, Segmenter, available_cores, resolve_precision
from dafne_node.model.labels import LEG_MUSCLES, Label
from dafne_node.model.manifest import ModelManifest, save_model_dir
from dafne_node.model.metrics import dice_per_label, mean_dice
from dafne_node.model.preprocess import (
    PreprocessConfig,
    labels_to_model_grid,
    normalize_intensity,
    plan_geometry,
    to_model_grid,
)

LOGGER = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "DEFAULT_PARAMS",
    "DEFAULT_PREPROCESSING",
    "EvaluationResult",
    "TrainingExample",
    "TrainingReport",
    "build_default_model",
    "evaluate",
    "prepare_examples",
    "train",
]

DEFAULT_ARCHITECTURE = "unet2d-res"
DEFAULT_PARAMS: dict[str, int] = {
    "in_channels": 1, "num_classes": 7, "base_channels": 16, "depth": 4,
    "max_channels": 256, "groups": 8,
}
DEFAULT_PREPROCESSING = PreprocessConfig(
    target_spacing_mm=1.5, input_shape=(128, 256), percentile_low=1.0, percentile_high=99.0
)


@dataclass(frozen=True)
class TrainingExample:
    """One labelled volume: ``pixels`` and ``labels`` are ``(slices, rows, cols)``."""

    pixels: np.ndarray
    labels: np.ndarray
    pixel_spacing: tuple[float, float]

    def __post_init__(self) -> None:
        """Refuse mismatched arrays early, with the shapes in the message."""
        if np.shape(self.pixels) != np.shape(self.labels) or np.ndim(self.pixels) != 3:
            raise ValueError(
                f"pixels {np.shape(self.pixels)} and labels {np.shape(self.labels)} must be "
                "volumes of the same shape (slices, rows, cols)"
            )


@dataclass
class TrainingReport:
    """What a training run did; JSON-able via :func:`dataclasses.asdict`.

    ``steps`` is the length of the whole run; ``completed_steps`` is less when the run was
    stopped (``interrupted``), and ``resumed_from`` is the step a resumed call started at.
    Losses, history and ``seconds`` cover the whole run across resumptions.
    """

    steps: int
    batch_size: int
    lr: float
    seed: int
    precision: str
    examples: int
    slices: int
    seconds: float
    initial_loss: float
    final_loss: float
    loss_history: list[float] = field(default_factory=list)
    completed_steps: int = 0
    resumed_from: int = 0
    interrupted: bool = False
    threads: int = 0


@dataclass
class EvaluationResult:
    """Dice of a model on labelled volumes."""

    mean_dice: float
    per_label: dict[str, float]
    per_example: list[float]


def prepare_examples(
    examples: Sequence[TrainingExample], config: PreprocessConfig, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocess volumes onto the network grid, exactly as inference will see them.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        Images float32 ``(N, 1, H, W)`` and labels uint8 ``(N, H, W)``, one row per slice.
    """
    images, labels = [], []
    for ex in examples:
        normalized = normalize_intensity(np.asarray(ex.pixels), config)
        geometry = plan_geometry(normalized, ex.pixel_spacing, config)
        images.append(to_model_grid(normalized, geometry))
        labels.append(labels_to_model_grid(np.asarray(ex.labels), geometry, num_classes)
                      .to(torch.uint8))
    if not images:
        raise ValueError("no training examples")
    return torch.cat(images), torch.cat(labels)


def _augment(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
             contrast_fold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, affine jitter and intensity changes of a batch (see module docstring).

    ``contrast_fold`` is the probability that a slice's contrast is folded
    (:func:`_fold_contrast`); at 0 nothing extra is drawn from ``gen``, so runs without it
    repeat the random stream of earlier versions exactly.
    """
    n = images.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (n,), generator=gen)

    if contrast_fold > 0:
        folded = _fold_contrast(images, uniform(0.05, 0.15), uniform(0.3, 0.55),
                                uniform(0.0, 0.15))
        chosen = torch.rand(n, generator=gen) < contrast_fold
        images = torch.where(chosen.view(n, 1, 1, 1), folded, images)

    # Left-right flip.
    flip = torch.rand(n, generator=gen) < 0.5
    images = torch.where(flip.view(n, 1, 1, 1), images.flip(-1), images)
    labels = torch.where(flip.view(n, 1, 1), labels.flip(-1), labels)

    # Rotation +-12 deg, isotropic scale 0.85-1.15, shift +-6 % of the field of view.
    angle = uniform(-12.0, 12.0) * math.pi / 180
    scale = uniform(0.85, 1.15)
    shift = uniform(-0.06, 0.06, n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = functional.affine_grid(theta, list(images.shape), align_corners=False)
    images = functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                    align_corners=False)
    labels = functional.grid_sample(labels.unsqueeze(1).float(), grid, mode="nearest",
                                    padding_mode="zeros", align_corners=False)
    labels = labels.squeeze(1).long()

    # Intensity: smooth multiplicative bias field, gamma, contrast/brightness, noise.
    coarse = uniform(-0.25, 0.25, n, 1, 4, 4) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.5)
    bias = functional.interpolate(coarse, size=images.shape[-2:], mode="bicubic",
                                  align_corners=False).exp()
    images = images * bias
    gamma = uniform(0.7, 1.5).view(n, 1, 1, 1)
    images = images.clamp(0, 1.5) ** gamma
    images = images * uniform(0.85, 1.15).view(n, 1, 1, 1) + uniform(-0.05, 0.05).view(n, 1, 1, 1)
    sigma = uniform(0.0, 0.04).view(n, 1, 1, 1)
    images = images + sigma * torch.randn(images.shape, generator=gen)
    return images, labels


def _fold_contrast(images: torch.Tensor, floor: torch.Tensor, peak: torch.Tensor,
                   end: torch.Tensor) -> torch.Tensor:
    """Fold normalised intensities: a continuous tent with the top at ``peak``.

    Below ``floor`` (air, cortex, tendon) values stay as they are; from ``floor`` to ``peak``
    they rise to 1; above ``peak`` they fall to ``end`` at 1. On a T1 image (fat 1, muscle
    about 0.36) muscle becomes the brightest tissue and fat dark, as on a Dixon water image.
    Each argument holds one value per slice.
    """
    floor, peak, end = (v.view(-1, 1, 1, 1) for v in (floor, peak, end))
    rising = floor + (1 - floor) * (images - floor) / (peak - floor)
    falling = (1 - (1 - end) * (images - peak) / (1 - peak)).clamp(min=0)
    return torch.where(images < floor, images, torch.where(images < peak, rising, falling))


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus (1 - soft Dice) averaged over the foreground classes of the batch."""
    logits = logits.float()
    ce = functional.cross_entropy(logits, labels)
    probs = functional.softmax(logits, dim=1)[:, 1:]
    one_hot = functional.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    dims = (0, 2, 3)
    inter = (probs * one_hot).sum(dims)
    denom = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1 - dice).mean()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _sha256_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hash of named tensors (names, dtypes, shapes and bytes), to recognise a run's inputs."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _fingerprint(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 settings: Mapping[str, Any]) -> dict[str, Any]:
    """What a run starts from, so that a checkpoint is resumed only into the same run."""
    return {
        "data": _sha256_tensors([("images", images), ("labels", labels)]),
        "initial_weights": _sha256_tensors(sorted(model.state_dict().items())),
        "settings": dict(settings),
    }


def _check_fingerprint(state: TrainingState, expected: Mapping[str, Any],
                       directory: Path) -> None:
    """Refuse a checkpoint of another run, naming what differs."""
    differs = [key for key in ("data", "initial_weights", "settings")
               if state.fingerprint.get(key) != expected[key]]
    if differs:
        detail = (f" (checkpoint {state.fingerprint.get('settings')}, now {expected['settings']})"
                  if "settings" in differs else "")
        raise CheckpointError(f"checkpoint in {directory} belongs to another run: "
                              f"its {', '.join(differs)} differ{detail}")


def _capture_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: Sequence[str],
                   gen: torch.Generator, *, step: int, steps: int,
                   fingerprint: dict[str, Any], losses: list[float],
                   seconds: float) -> TrainingState:
    """Snapshot of a run at a step boundary, with optimizer state keyed by parameter name."""
    opt = optimizer.state_dict()
    tensors = {f"{names[idx]}/{key}": value
               for idx, per_param in opt["state"].items() for key, value in per_param.items()}
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [names[i] for i in group["params"]]} for group in opt["param_groups"]]
    return TrainingState(step=step, total_steps=steps, fingerprint=fingerprint,
                         model=dict(model.state_dict()), optimizer=tensors, param_groups=groups,
                         rng=gen.get_state(), losses=list(losses), seconds=seconds)


def _restore_state(state: TrainingState, model: nn.Module, optimizer: torch.optim.Optimizer,
                   names: Sequence[str], gen: torch.Generator) -> None:
    """Put a checkpoint's weights, optimizer state and random state back in place."""
    index = {name: i for i, name in enumerate(names)}
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    try:
        model.load_state_dict(state.model, strict=True)
        for key, value in state.optimizer.items():
            name, _, item = key.rpartition("/")
            per_param.setdefault(index[name], {})[item] = value
        groups = [{**group, "params": [index[n] for n in group["params"]]}
                  for group in state.param_groups]
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint does not fit this model and optimizer: {exc}"
                              ) from None
    gen.set_state(state.rng)


def _run_precision(precision: Precision, device: torch.device,
                   threads: int | None) -> Literal["bf16", "fp32"]:
    """Resolve the precision for ``device`` and bound torch's threads on a CPU."""
    if device.type == "cpu":
        wanted = threads or available_cores()
        if wanted < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        return resolve_precision(precision)
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return resolve_precision(precision)


class _TrainingPass:
    """The training step's forward and backward pass, compiled or as written.

    A compiled forward is built lazily by torch: the compile (and a failure to compile)
    happens in the first step's forward or backward. Nothing has been applied to the
    weights by then, so that step can be redone uncompiled.
    """

    def __init__(self, model: nn.Module, compiled: bool) -> None:
        self._model = model
        self._network: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model) if compiled else model)
        self._untried = compiled

    def loss_and_backward(self, x: torch.Tensor, y: torch.Tensor, device_type: str,
                          precision: Literal["bf16", "fp32"]) -> torch.Tensor:
        """Loss of one batch, with its gradients accumulated into the model's."""
        try:
            loss = self._pass(self._network, x, y, device_type, precision)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            if not self._untried:
                raise
            reason = str(exc.inner_exception).strip().splitlines() or [""]
            LOGGER.warning("could not compile the network (%s: %s); training it uncompiled",
                           type(exc.inner_exception).__name__, reason[0])
            self._network = self._model
            self._model.zero_grad(set_to_none=True)
            loss = self._pass(self._model, x, y, device_type, precision)
        self._untried = False
        return loss

    @staticmethod
    def _pass(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              y: torch.Tensor, device_type: str,
              precision: Literal["bf16", "fp32"]) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = network(x)
        loss = dice_ce_loss(logits, y)
        loss.backward()
        return loss


def _summarise(losses: Sequence[float]) -> tuple[float, float, list[float]]:
    """Initial and final loss (means over a window) and a history of at most ~50 points."""
    if not losses:
        return float("nan"), float("nan"), []
    window = max(1, min(20, len(losses) // 4 or 1))
    chunk = max(1, len(losses) // 50)
    history = [float(np.mean(losses[i:i + chunk])) for i in range(0, len(losses), chunk)]
    return float(np.mean(losses[:window])), float(np.mean(losses[-window:])), history


def train(
    model: nn.Module,
    examples: Sequence[TrainingExample],
    *,
    preprocessing: PreprocessConfig,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 2e-3,
    batch_size: int = 8,
    seed: int = 0,
    weight_decay: float = 1e-4,
    augment: bool = True,
    contrast_fold: float = 0.0,
    precision: Precision = "fp32",
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    between_steps: Callable[[], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    compile_model: bool = False,
) -> TrainingReport:
    """Train ``model`` in place on labelled volumes; stoppable and resumable at any step.

    Parameters
    ----------
    model:
        A module from ``build_model`` (fresh, or a loaded generation to fine-tune). It is
        left in eval mode.
    examples:
        Labelled volumes; their slices are the samples.
    preprocessing:
        The model's preprocessing (from its manifest, or the one it will be saved with).
    steps, epochs:
        Length of the run: exactly one of them; ``epochs`` counts passes over all slices.
    lr:
        Peak learning rate (warm-up 5 % of the steps, then cosine decay to 2 % of it).
        Use ~2e-3 from scratch and ~2e-4 for fine-tuning.
    batch_size:
        Slices per step.
    seed:
        Seeds slice sampling and augmentation (the caller seeds the initial weights).
    weight_decay:
        AdamW weight decay.
    augment:
        Apply flips, affine and intensity augmentation.
    contrast_fold:
        Probability that an augmented slice's contrast is folded (fat-suppression-like,
        see the module docstring); 0 (default) never.
    precision:
        ``"fp32"`` (default), ``"bf16"`` (autocast; faster on CPUs with bf16 instructions)
        or ``"auto"``.
    progress:
        Show a tqdm progress bar.
    callback:
        Called as ``callback(step, loss)`` after every step (e.g. to stop at a deadline by
        raising, or to report progress elsewhere).
    device:
        Where to train (``"cpu"``, or ``"cuda"`` on a node that has a GPU). The model is
        moved there and left there.
    threads:
        Torch intra-op threads on a CPU (process-wide); default: every core this process may
        use. A node's trainer process bounds it so that segmentation keeps some cores.
    should_stop:
        Asked before every step; when it returns true the run writes a checkpoint (if
        ``checkpoint_dir`` is given) and returns with ``report.interrupted`` set.
    between_steps:
        Called before every step, before ``should_stop``; it may block, e.g. to pause
        training while segmentation jobs wait.
    checkpoint_dir:
        The run's checkpoint directory (see :mod:`dafne_node.model.checkpoint`). If it holds a
        checkpoint of this run (same data, initial weights and settings), training continues
        from it and ends with the weights an uninterrupted run would have; a checkpoint is
        written when the run stops and when it completes.
    checkpoint_every:
        Also write a checkpoint every this many steps, so that a killed process loses at
        most that much work.
    compile_model:
        Run the network's forward and backward through ``torch.compile`` (inductor), which
        fuses each normalisation, activation and bf16 cast into the kernels around it. On a
        CPU a step is then 1.2x (16 base channels) to 1.4x (24) faster, after a one-off
        compile of 30-60 s that inductor caches on disk (a few seconds in later processes).
        Worth it for long runs and wide networks; where compiling fails (no C++ compiler),
        the run warns and trains uncompiled. Applies to bf16 training only: in fp32 the
        compiled step is no faster on a CPU (1.22 s against 1.28 s at 16 channels), and
        torch 2.13's channels-last rewrite of fp32 training crashed on small networks.

    Returns
    -------
    TrainingReport
        Steps, timing and the loss curve (of the whole run, across resumptions).

    Raises
    ------
    CheckpointError
        If ``checkpoint_dir`` holds an unreadable checkpoint or one of another run.
    FloatingPointError
        If the loss becomes NaN or infinite.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}")
    if not 0 <= contrast_fold <= 1:
        raise ValueError(f"contrast_fold must be a probability, got {contrast_fold}")
    num_classes = int(getattr(model, "architecture_params", {}).get("num_classes", 7))
    images, labels = prepare_examples(examples, preprocessing, num_classes)
    n_slices = images.shape[0]
    if epochs is not None:
        steps = max(1, math.ceil(epochs * n_slices / batch_size))
    assert steps is not None
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    device = torch.device(device)
    run_precision = _run_precision(precision, device, threads)

    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                "weight_decay": weight_decay, "augment": augment, "precision": run_precision}
    if contrast_fold:  # absent at 0, so checkpoints of earlier versions stay valid
        settings["contrast_fold"] = contrast_fold
    compiled = compile_model and run_precision == "bf16"
    if compiled:  # fused kernels round differently: a resumed run must not switch
        settings["compiled"] = True
    elif compile_model:
        LOGGER.info("compiling applies to bf16 training; this %s run trains uncompiled",
                    run_precision)
    fingerprint = _fingerprint(model, images, labels, settings)
    gen = torch.Generator().manual_seed(seed)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    losses: list[float] = []
    start_step, previous_seconds = 0, 0.0
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoints is not None and (state := load_checkpoint(checkpoints)) is not None:
        _check_fingerprint(state, fingerprint, checkpoints)
        _restore_state(state, model, optimizer, names, gen)
        start_step, losses, previous_seconds = state.step, state.losses, state.seconds
        LOGGER.info("resuming training at step %d of %d from %s", start_step, steps,
                    checkpoints)

    def checkpoint(step: int) -> None:
        if checkpoints is not None:
            save_checkpoint(checkpoints, _capture_state(
                model, optimizer, names, gen, step=step, steps=steps, fingerprint=fingerprint,
                losses=losses, seconds=previous_seconds + time.perf_counter() - start))

    warmup = max(1, steps // 20)
    model.train()
    # Training runs in NCHW: GroupNorm's backward is ~10x slower on channels-last CPU tensors
    # (and has crashed there with small group sizes), which outweighs the faster convolutions.
    model.to(device=device, memory_format=torch.contiguous_format)
    start = time.perf_counter()
    LOGGER.info("training %d steps, batch %d, lr %g, %s%s, %d threads, on %d slices of %d "
                "examples", steps, batch_size, lr, run_precision,
                " compiled" if compiled else "", torch.get_num_threads(), n_slices,
                len(examples))
    training_pass = _TrainingPass(model, compiled)
    bar = tqdm(range(start_step, steps), desc="training", unit="step", disable=not progress,
               dynamic_ncols=True, initial=start_step, total=steps)
    interrupted_at: int | None = None
    try:
        for step in bar:
            if between_steps is not None:
                between_steps()
            if should_stop is not None and should_stop():
                interrupted_at = step
                break
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(step, steps, warmup)
            idx = torch.randint(0, n_slices, (batch_size,), generator=gen)
            x, y = images[idx], labels[idx].long()
            if augment:
                x, y = _augment(x, y, gen, contrast_fold)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = training_pass.loss_and_backward(x, y, device.type, run_precision)
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {step}")
            losses.append(value)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if callback is not None:
                callback(step, value)
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                checkpoint(step + 1)
        checkpoint(steps if interrupted_at is None else interrupted_at)
    finally:
        bar.close()
        model.eval()
    seconds = previous_seconds + time.perf_counter() - start
    initial, final, history = _summarise(losses)
    report = TrainingReport(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, precision=run_precision,
        examples=len(examples), slices=n_slices, seconds=round(seconds, 1),
        initial_loss=initial, final_loss=final, loss_history=history,
        completed_steps=len(losses), resumed_from=start_step,
        interrupted=interrupted_at is not None, threads=torch.get_num_threads(),
    )
    if report.interrupted:
        LOGGER.info("training stopped at step %d of %d after %.0f s", len(losses), steps,
                    seconds)
    else:
        LOGGER.info("trained %d steps in %.0f s, loss %.3f -> %.3f", steps, seconds,
                    report.initial_loss, report.final_loss)
    return report


def evaluate(segmenter: Segmenter, examples: Sequence[TrainingExample],
             labels: Sequence[Label] = LEG_MUSCLES) -> EvaluationResult:
    """Dice of ``segmenter`` on labelled volumes, per label and per example.

    ``per_label`` is keyed by label key and averages each label's Dice over the examples
    where it is present (in prediction or truth); ``per_example`` holds each volume's mean
    over its labels; ``mean_dice`` is the mean of ``per_example``.
    """
    values = [label.value for label in labels]
    per_example: list[float] = []
    collected: dict[int, list[float]] = {v: [] for v in values}
    for ex in examples:
        pred = segmenter.segment(np.asarray(ex.pixels), ex.pixel_spacing)
        dice = dice_per_label(pred, np.asarray(ex.labels), values)
        per_example.append(mean_dice(dice))
        for v, d in dice.items():
            if not math.isnan(d):
                collected[v].append(d)
    per_label = {label.key: float(np.mean(collected[label.value]))
                 if collected[label.value] else float("nan") for label in labels}
    finite = [d for d in per_example if not math.isnan(d)]
    return EvaluationResult(
        mean_dice=float(np.mean(finite)) if finite else float("nan"),
        per_label=per_label, per_example=per_example,
    )


def _phantom_examples(site: str, seeds: Sequence[int], slices: int) -> list[TrainingExample]:
    from dafne_node.phantom import make_study  # noqa: PLC0415 - optional at import time

    out = []
    for seed in seeds:
        study = make_study(site=site, seed=seed, slices=slices)
        out.append(TrainingExample(pixels=study.pixels, labels=study.labels,
                                   pixel_spacing=tuple(study.pixel_spacing)))
    return out


def build_default_model(
    out_dir: str | Path,
    *,
    train_subjects: int = 48,
    val_subjects: int = 20,
    steps: int = 1200,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    slices: int = 40,
    eval_sites: Sequence[str] = ("B", "C", "D"),
    precision: Precision = "auto",
    progress: bool = True,
    params: Mapping[str, int] | None = None,
    preprocessing: PreprocessConfig = DEFAULT_PREPROCESSING,
    device: str | torch.device = "cpu",
) -> ModelManifest:
    """Train the bundled default model on site-A phantoms and save it to ``out_dir``.

    Training uses site-A phantom subjects with seeds ``1000 .. 1000 + train_subjects - 1``;
    evaluation uses seeds ``0 .. val_subjects - 1`` of site A (held out: never trained on)
    and of each of ``eval_sites`` (other protocols, to show the domain shift federated
    learning has to close). The Dice values, data seeds and training report go into the
    manifest's ``training`` summary. The ``dafne-node model build-default`` command calls
    this function.

    Parameters
    ----------
    out_dir:
        Model directory to write (replaced atomically), normally
        :func:`dafne_node.model.manifest.default_model_dir`.
    train_subjects, val_subjects:
        Number of training and of evaluation phantom subjects per site.
    steps, batch_size, lr:
        Optimiser steps, slices per step and peak learning rate.
    seed:
        Seeds the initial weights and the training randomness.
    slices:
        Slices per phantom study.
    eval_sites:
        Sites evaluated besides held-out site A.
    precision:
        Training precision: "auto" (default) uses bf16 autocast where the CPU has native
        bf16 (about 1.5x faster per step here, same Dice), else fp32.
    progress:
        Show progress bars.
    params:
        Architecture parameters overriding :data:`DEFAULT_PARAMS` (for experiments).
    preprocessing:
        The network's grid (for experiments: a coarser grid trains and segments faster).
    device:
        Training device; evaluation always runs on the CPU, as on a node.

    Returns
    -------
    ModelManifest
        The saved manifest, whose ``training`` holds the metrics.
    """
    started = time.perf_counter()
    train_seeds = list(range(1000, 1000 + train_subjects))
    val_seeds = list(range(val_subjects))
    if set(train_seeds) & set(val_seeds):
        raise ValueError("training and evaluation phantom seeds overlap")
    LOGGER.info("generating %d site-A training phantoms", train_subjects)
    examples = _phantom_examples("A", train_seeds, slices)

    torch.manual_seed(seed)
    model = build_model(DEFAULT_ARCHITECTURE, {**DEFAULT_PARAMS, **(params or {})})
    report = train(model, examples, preprocessing=preprocessing, steps=steps,
                   lr=lr, batch_size=batch_size, seed=seed, precision=precision,
                   progress=progress, device=device)
    model.to("cpu")
    del examples

    segmenter = Segmenter(model, preprocessing)
    evaluation: dict[str, Any] = {}
    for site in ("A", *eval_sites) if val_seeds else ():  # none held out: nothing to score
        result = evaluate(segmenter, _phantom_examples(site, val_seeds, slices))
        evaluation[site] = {"mean_dice": result.mean_dice, "per_label": result.per_label}
        LOGGER.info("site %s held-out mean Dice %.4f %s", site, result.mean_dice,
                    {k: round(v, 3) for k, v in result.per_label.items()})

    summary = {
        "data": "synthetic lower-leg phantoms (dafne_node.phantom)",
        "train_site": "A",
        "train_seeds": [train_seeds[0], train_seeds[-1]],
        "eval_seeds": [val_seeds[0], val_seeds[-1]] if val_seeds else [],
        "eval_subjects_per_site": val_subjects,
        "slices_per_study": slices,
        "parameters": count_parameters(model),
        "report": {k: v for k, v in asdict(report).items() if k != "loss_history"},
        "heldout_dice": evaluation,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    return save_model_dir(model, out_dir, name="Dafne leg", generation=1,
                          preprocessing=preprocessing, labels=LEG_MUSCLES,
                          training=summary)
