"""Stopping a training run at a step, and continuing it from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from dafne_node.model.architectures import build_model
from dafne_node.model.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from dafne_node.model.train import TrainingExample, train

STEPS = 6


@pytest.fixture()
def examples(synthetic_volume) -> list[TrainingExample]:
    return [TrainingExample(*synthetic_volume(s, slices=3), pixel_spacing=(2.0, 2.0))
            for s in range(2)]


def _model(tiny_params) -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model("unet2d-res", tiny_params)


def _run(model, examples, preprocessing, **options):
    options = {"steps": STEPS, "batch_size": 2, "lr": 3e-3, "seed": 7, "threads": 1,
               "progress": False, **options}
    return train(model, examples, preprocessing=preprocessing, **options)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def _stop_after(calls: int):
    count = {"n": 0}

    def should_stop() -> bool:
        count["n"] += 1
        return count["n"] > calls
    return should_stop


def test_stop_and_resume_gives_the_weights_of_a_straight_run(
        examples, tiny_params, tiny_preprocessing, tmp_path) -> None:
    straight = _model(tiny_params)
    full = _run(straight, examples, tiny_preprocessing)

    resumed = _model(tiny_params)
    paused: list[int] = []
    first = _run(resumed, examples, tiny_preprocessing, checkpoint_dir=tmp_path,
                 should_stop=_stop_after(2), between_steps=lambda: paused.append(1))
    assert first.interrupted and first.completed_steps == 2 and first.steps == STEPS
    assert len(paused) == 3  # called before each of the 2 steps and before the refusal
    assert load_checkpoint(tmp_path).step == 2

    again = _model(tiny_params)  # a fresh process would rebuild the base model
    second = _run(again, examples, tiny_preprocessing, checkpoint_dir=tmp_path)
    assert not second.interrupted and second.resumed_from == 2
    assert second.completed_steps == STEPS
    _assert_same_weights(straight, again)
    assert second.final_loss == full.final_loss
    assert load_checkpoint(tmp_path).step == STEPS


def test_periodic_checkpoint_survives_a_crash(examples, tiny_params, tiny_preprocessing,
                                              tmp_path) -> None:
    straight = _model(tiny_params)
    _run(straight, examples, tiny_preprocessing)

    def crash(step: int, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    crashed = _model(tiny_params)
    with pytest.raises(KeyboardInterrupt):
        _run(crashed, examples, tiny_preprocessing, checkpoint_dir=tmp_path,
             checkpoint_every=2, callback=crash)
    assert load_checkpoint(tmp_path).step == 4

    again = _model(tiny_params)
    report = _run(again, examples, tiny_preprocessing, checkpoint_dir=tmp_path)
    assert report.resumed_from == 4
    _assert_same_weights(straight, again)


def test_a_finished_checkpoint_runs_no_more_steps(examples, tiny_params, tiny_preprocessing,
                                                  tmp_path) -> None:
    done = _model(tiny_params)
    _run(done, examples, tiny_preprocessing, checkpoint_dir=tmp_path)
    calls: list[int] = []
    again = _model(tiny_params)
    report = _run(again, examples, tiny_preprocessing, checkpoint_dir=tmp_path,
                  callback=lambda step, loss: calls.append(step))
    assert calls == [] and report.completed_steps == STEPS and report.resumed_from == STEPS
    _assert_same_weights(done, again)


def test_checkpoint_of_another_run_is_refused(examples, tiny_params, tiny_preprocessing,
                                              tmp_path) -> None:
    _run(_model(tiny_params), examples, tiny_preprocessing, checkpoint_dir=tmp_path,
         should_stop=_stop_after(1))
    with pytest.raises(CheckpointError, match="settings differ"):
        _run(_model(tiny_params), examples, tiny_preprocessing, checkpoint_dir=tmp_path,
             seed=8)
    with pytest.raises(CheckpointError, match="data differ"):
        _run(_model(tiny_params), examples[:1], tiny_preprocessing, checkpoint_dir=tmp_path)
    torch.manual_seed(99)
    other_base = build_model("unet2d-res", tiny_params)
    with pytest.raises(CheckpointError, match="initial_weights differ"):
        _run(other_base, examples, tiny_preprocessing, checkpoint_dir=tmp_path)


def test_checkpoint_is_one_safetensors_file_without_pickle(examples, tiny_params,
                                                           tiny_preprocessing, tmp_path) -> None:
    _run(_model(tiny_params), examples, tiny_preprocessing, checkpoint_dir=tmp_path,
         should_stop=_stop_after(3))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    raw = (tmp_path / CHECKPOINT_FILE).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])  # safetensors: a JSON header, then raw tensor bytes
    state = json.loads(header["__metadata__"]["state"])
    assert state["step"] == 3 and len(state["losses"]) == 3
    names = set(header) - {"__metadata__"}
    assert "rng" in names
    assert any(n.startswith("model/") for n in names)
    assert any(n.endswith("/exp_avg_sq") for n in names)
    assert any(n.endswith("/step") for n in names)


def test_unreadable_checkpoint_is_reported(tmp_path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "absent") is None


_WRITER = """
import sys, torch
from dafne_node.model.checkpoint import TrainingState, save_checkpoint
step = 0
while True:
    step += 1
    value = torch.full((1 << 20,), float(step))  # 4 MiB, so a kill often lands mid-write
    save_checkpoint(sys.argv[1], TrainingState(
        step=step, total_steps=10**9, fingerprint={}, model={"w": value},
        optimizer={"w/exp_avg": value.clone()}, param_groups=[],
        rng=torch.zeros(4, dtype=torch.uint8),
        losses=[float(step)] * min(step, 100), seconds=0.0))
    print(step, flush=True)
"""


@pytest.mark.parametrize("delay", [0.3, 0.7])
def test_sigkill_leaves_a_whole_checkpoint(tmp_path, delay: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the first checkpoint is complete
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    state = load_checkpoint(tmp_path)
    assert state is not None and state.step >= 1
    assert torch.equal(state.model["w"], torch.full((1 << 20,), float(state.step)))
    assert torch.equal(state.optimizer["w/exp_avg"], state.model["w"])
    # The next write cleans up whatever temporary file the kill left behind.
    save_checkpoint(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
