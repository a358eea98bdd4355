"""Training checkpoints: stop a run at a step boundary and continue it later, bit for bit.

A node trains only inside the windows its IT department allows, and segmentation jobs take
precedence, so a fine-tuning run must be able to stop at any step and continue in the next
window as if it had never stopped. A checkpoint therefore holds everything the next step
depends on: the model weights, AdamW's moment estimates and step counts, the step reached,
the state of the run's random generator and the loss history, plus a fingerprint of what the
run was started with (data, initial weights, settings) so that a checkpoint is never resumed
into a different run.

Format and why:

* One safetensors file, ``checkpoint.safetensors``: the tensors as safetensors tensors and
  everything else as JSON in the file's header metadata. No pickle and no ``torch.save``:
  loading a checkpoint must not be able to run code, exactly like loading a model.
* One file, written in a staging directory beside it, fsynced, renamed over the old one,
  and the directory fsynced. A rename within a file system is atomic, so a process killed
  at any moment (SIGKILL, power loss after the fsyncs) leaves either the previous
  checkpoint or the new one, never a mixture; a staging directory left by a kill is
  ignored on load and removed by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dafne_node.durable import fsync_dir

LOGGER = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointError",
    "TrainingState",
    "load_checkpoint",
    "remove_checkpoint",
    "save_checkpoint",
    "save_safetensors_atomically",
]

CHECKPOINT_FILE = "checkpoint.safetensors"
_FORMAT = "dafne-training-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another run."""


@dataclass
class TrainingState:
    """Everything a training run needs to continue from a step boundary.

    Attributes
    ----------
    step:
        Optimiser steps completed (the next step to run has this index).
    total_steps:
        Length of the whole run.
    fingerprint:
        What the run was started with (hashes of the data and of the initial weights, and
        the settings), compared on resume; JSON-able.
    model:
        The model's ``state_dict`` tensors.
    optimizer:
        AdamW state tensors keyed ``"<parameter name>/<state key>"`` (names, not positions,
        so the mapping does not depend on parameter order).
    param_groups:
        The optimizer's parameter groups as JSON, with ``"params"`` holding parameter names.
    rng:
        State of the run's ``torch.Generator`` (uint8 tensor).
    losses:
        Loss of every completed step.
    seconds:
        Training time spent so far, over all the segments of the run.
    """

    step: int
    total_steps: int
    fingerprint: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    param_groups: list[dict[str, Any]]
    rng: torch.Tensor
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0



def _staging_prefix(target: Path) -> str:
    return f".{target.name}.staging-"


def save_safetensors_atomically(path: str | os.PathLike[str],
                                tensors: dict[str, torch.Tensor],
                                metadata: dict[str, str]) -> Path:
    """Write a safetensors file so that ``path`` is always either the old file or the new one.

    The file is written in a private staging directory beside ``path`` (safetensors itself
    writes through temporary files, which a kill would otherwise strand next to ``path``),
    fsynced, renamed onto ``path``, and the directory fsynced. Staging directories left
    behind by a killed writer are removed by the next write to the same path (one writer
    per path at a time).

    Parameters
    ----------
    path:
        The file to create or replace (its directory is created if missing).
    tensors:
        Tensors to store (copied to contiguous CPU tensors first).
    metadata:
        String metadata stored in the file's header.

    Returns
    -------
    Path
        ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{_staging_prefix(target)}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
    try:
        tmp = staging / target.name
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                  str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(target.parent)
    return target


def save_checkpoint(directory: str | os.PathLike[str], state: TrainingState) -> Path:
    """Write ``state`` as the checkpoint of ``directory``, atomically replacing the old one.

    Parameters
    ----------
    directory:
        The run's checkpoint directory (created if missing).
    state:
        The state to write.

    Returns
    -------
    Path
        The checkpoint file.
    """
    header = {
        "step": state.step, "total_steps": state.total_steps, "fingerprint": state.fingerprint,
        "param_groups": state.param_groups, "losses": state.losses, "seconds": state.seconds,
    }
    tensors = {f"model/{k}": v for k, v in state.model.items()}
    tensors.update({f"optimizer/{k}": v for k, v in state.optimizer.items()})
    tensors["rng"] = state.rng
    target = save_safetensors_atomically(
        Path(directory) / CHECKPOINT_FILE, tensors,
        {"format": _FORMAT, "state": json.dumps(header, allow_nan=False)})
    LOGGER.debug("checkpoint at step %d of %d written to %s", state.step, state.total_steps,
                 target)
    return target


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def load_checkpoint(directory: str | os.PathLike[str]) -> TrainingState | None:
    """Read the checkpoint of ``directory``.

    Returns
    -------
    TrainingState or None
        The state, or ``None`` when the directory holds no checkpoint (a fresh run).

    Raises
    ------
    CheckpointError
        If the file is not a readable checkpoint of this format.
    """
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}"
                              ) from None
    if metadata.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {metadata.get('format')!r}, "
                              f"expected {_FORMAT!r}")
    try:
        header = json.loads(metadata["state"])
        state = TrainingState(
            step=int(header["step"]), total_steps=int(header["total_steps"]),
            fingerprint=dict(header["fingerprint"]), model=_split(tensors, "model/"),
            optimizer=_split(tensors, "optimizer/"), param_groups=list(header["param_groups"]),
            rng=tensors["rng"], losses=[float(v) for v in header["losses"]],
            seconds=float(header["seconds"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete or malformed: {exc!r}") from None
    if not 0 <= state.step <= state.total_steps:
        raise CheckpointError(f"checkpoint {path}: step {state.step} is outside the run's "
                              f"{state.total_steps} steps")
    return state


def remove_checkpoint(directory: str | os.PathLike[str]) -> None:
    """Delete the checkpoint of ``directory`` and any staging leftovers, once a run is done."""
    target = Path(directory) / CHECKPOINT_FILE
    target.unlink(missing_ok=True)
    if target.parent.is_dir():
        for stale in target.parent.glob(f"{_staging_prefix(target)}*"):
            shutil.rmtree(stale, ignore_errors=True)
        fsync_dir(target.parent)
