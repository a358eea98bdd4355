"""Incremental fine-tuning: replay, the local gate, outputs, and stopping and resuming."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dafne_node.learning.delta import apply_delta, load_delta
from dafne_node.learning.finetune import (
    FinetuneSettings,
    finetune,
    replay_count,
    select_replay,
    split_holdout,
)
from dafne_node.model.architectures import build_model
from dafne_node.model.checkpoint import load_checkpoint
from dafne_node.model.manifest import load_model_dir, save_model_dir
from dafne_node.model.train import TrainingExample, train
from tests.model.conftest import TINY_PARAMS, TINY_PREPROCESSING, _synthetic_volume

QUICK = FinetuneSettings(steps=6, batch_size=2, lr=1e-3, checkpoint_every=2, threads=1,
                         precision="fp32", max_dice_drop=1.0)


def _examples(seeds, *, blank: bool = False) -> list[TrainingExample]:
    out = []
    for seed in seeds:
        pixels, labels = _synthetic_volume(seed, slices=4)
        out.append(TrainingExample(pixels, np.zeros_like(labels) if blank else labels,
                                   pixel_spacing=(2.0, 2.0)))
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generation 1: a tiny model that has learnt the synthetic ellipses a little."""
    torch.manual_seed(0)
    model = build_model("unet2d-res", TINY_PARAMS)
    train(model, _examples(range(100, 104)), preprocessing=TINY_PREPROCESSING, steps=40,
          lr=3e-3, batch_size=4, augment=False, progress=False, threads=1)
    path = tmp_path_factory.mktemp("base") / "g1"
    save_model_dir(model, path, name="tiny", generation=1, preprocessing=TINY_PREPROCESSING)
    return path


def _run(base_dir: Path, tmp_path: Path, settings: FinetuneSettings = QUICK, *,
         new=None, heldout=None, name: str = "run", **options):
    new = _examples(range(10, 13)) if new is None else new
    heldout = _examples(range(20, 22)) if heldout is None else heldout
    return finetune(base_dir, new, _examples(range(30, 34)), heldout, settings,
                    out_dir=tmp_path / name, checkpoint_dir=tmp_path / f"{name}-ckpt",
                    progress=False, **options)


# -- pure helpers ----------------------------------------------------------------------------

def test_split_holdout_is_deterministic_and_stable() -> None:
    ids = [f"correction-{i}" for i in range(300)]
    train_ids, held = split_holdout(ids, fraction=0.2, min_examples=5)
    assert (train_ids, held) == split_holdout(ids, fraction=0.2, min_examples=5)
    assert sorted(train_ids + held) == sorted(ids) and not set(train_ids) & set(held)
    assert 0.12 < len(held) / len(ids) < 0.28
    assert held == [i for i in ids if i in set(held)]  # input order kept
    for n in range(1, len(ids)):
        before, _ = split_holdout(ids[:n], fraction=0.2, min_examples=5)
        _, after = split_holdout(ids[:n + 1], fraction=0.2, min_examples=5)
        moved = set(before) & set(after)  # trained on, then held out
        assert not moved or n + 1 == 5, (n, moved)


def test_split_holdout_holds_one_out_from_min_examples() -> None:
    ids = list(range(1000))
    rare = [i for i in ids if not split_holdout([i], fraction=0.01, min_examples=99)[1]][:6]
    assert split_holdout(rare[:4], fraction=0.01, min_examples=5)[1] == []
    _, held = split_holdout(rare[:5], fraction=0.01, min_examples=5)
    assert len(held) == 1
    assert split_holdout([], fraction=0.2) == ([], [])
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(ids, fraction=1.0)


def test_replay_sample() -> None:
    settings = FinetuneSettings(replay_fraction=0.3, max_replay=8)
    assert replay_count(10, 100, settings) == 5  # ceil(10 * 0.3 / 0.7)
    assert replay_count(10, 2, settings) == 2
    assert replay_count(100, 100, settings) == 8
    pool = [f"example-{i}" for i in range(50)]
    chosen = select_replay(pool, 10, settings)
    assert len(chosen) == 5 and chosen == sorted(chosen, key=pool.index)
    assert chosen == select_replay(pool, 10, settings)
    assert select_replay(chosen, 10, settings) == chosen  # a preselection stays whole
    assert select_replay(pool, 10, FinetuneSettings(replay_fraction=0.0)) == []


def test_settings_validation() -> None:
    assert FinetuneSettings(epochs=2).steps is None
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        FinetuneSettings(steps=10, epochs=2)
    with pytest.raises(ValueError, match="extra"):
        FinetuneSettings(stepz=10)
    with pytest.raises(ValueError, match="max_dice_drop"):
        FinetuneSettings(max_dice_drop=-0.1)


# -- runs ------------------------------------------------------------------------------------

def test_accepted_run_writes_local_model_and_delta(base_dir: Path, tmp_path: Path) -> None:
    outcome = _run(base_dir, tmp_path)
    assert outcome.status == "accepted" and outcome.accepted
    assert outcome.reason.startswith("gate passed: held-out Dice ")
    assert outcome.base_version == "g1" and outcome.version_label == "g1-local1"
    assert (outcome.num_new, outcome.num_replay, outcome.num_heldout) == (3, 3, 2)
    assert set(outcome.tuned_heldout.per_label) == set(outcome.base_heldout.per_label)
    assert outcome.report.steps == 6 and not outcome.report.interrupted
    json.dumps(outcome.to_json(), allow_nan=False)

    tuned = load_model_dir(outcome.model_dir)
    assert tuned.manifest.version_label == "g1-local1"
    assert tuned.manifest.training["base"] == "g1"
    base = load_model_dir(base_dir)
    delta = load_delta(outcome.delta_path)
    meta = delta.metadata
    assert (meta.base_generation, meta.local_round, meta.num_samples) == (1, 1, 6)
    assert meta.continues_round is None  # trained from the generation itself
    assert meta.base_sha256 == base.manifest.weights.sha256
    assert meta.metrics["heldout_dice_after"] == pytest.approx(outcome.tuned_heldout.mean_dice)
    rebuilt = apply_delta(base.model.state_dict(), delta.tensors)
    for name, weight in tuned.model.state_dict().items():
        torch.testing.assert_close(rebuilt[name], weight, rtol=0, atol=1e-5)
    assert not any((tmp_path / "run-ckpt").iterdir())  # finished: checkpoint removed


def test_gate_is_skipped_without_heldout_examples(base_dir: Path, tmp_path: Path) -> None:
    outcome = _run(base_dir, tmp_path, heldout=[])
    assert outcome.status == "accepted"
    assert outcome.reason == "gate skipped: no held-out examples"
    assert outcome.base_heldout is None and outcome.tuned_heldout is None
    assert load_delta(outcome.delta_path).metadata.metrics["heldout_examples"] == 0


def test_gate_rejects_a_model_that_got_worse(base_dir: Path, tmp_path: Path) -> None:
    # Corrections that erase every muscle teach the model to find none.
    settings = QUICK.model_copy(update={"lr": 3e-3, "max_dice_drop": 0.01, "replay_fraction": 0})
    outcome = _run(base_dir, tmp_path, settings, new=_examples(range(10, 13), blank=True))
    assert outcome.status == "rejected", outcome.reason
    assert "a drop of" in outcome.reason and "> 0.01" in outcome.reason
    assert outcome.tuned_heldout.mean_dice < outcome.base_heldout.mean_dice - 0.01
    assert outcome.model_dir is None and outcome.delta_path is None
    assert not (tmp_path / "run").exists()
    assert load_checkpoint(tmp_path / "run-ckpt") is None


def test_stopped_run_resumes_to_the_same_model(base_dir: Path, tmp_path: Path) -> None:
    straight = _run(base_dir, tmp_path, name="straight")
    asked = {"n": 0}

    def stop_after_three() -> bool:
        asked["n"] += 1
        return asked["n"] > 3

    stopped = _run(base_dir, tmp_path, name="resumed", should_stop=stop_after_three)
    assert stopped.status == "interrupted"
    assert stopped.reason.startswith("stopped at step 3 of 6")
    assert stopped.model_dir is None and not (tmp_path / "resumed").exists()
    assert load_checkpoint(tmp_path / "resumed-ckpt").step == 3

    pauses: list[int] = []
    resumed = _run(base_dir, tmp_path, name="resumed", between_steps=lambda: pauses.append(1))
    assert resumed.status == "accepted" and resumed.report.resumed_from == 3
    assert len(pauses) == 3
    a = load_model_dir(straight.model_dir).model.state_dict()
    b = load_model_dir(resumed.model_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_run_is_discarded(base_dir: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    _run(base_dir, tmp_path, should_stop=lambda: True)
    with caplog.at_level(logging.WARNING):
        outcome = _run(base_dir, tmp_path, new=_examples(range(40, 43)))
    assert outcome.status == "accepted" and outcome.report.resumed_from == 0
    assert "discarding checkpoint" in caplog.text and "data differ" in caplog.text


def test_local_model_fine_tunes_against_its_root(base_dir: Path, tmp_path: Path) -> None:
    first = _run(base_dir, tmp_path, name="first", heldout=[])
    with pytest.raises(ValueError, match="not a root generation"):
        _run(first.model_dir, tmp_path, name="second")
    second = _run(first.model_dir, tmp_path, name="second", root_dir=base_dir,
                  new=_examples(range(50, 53)))
    assert second.base_version == "g1-local1" and second.version_label == "g1-local2"
    root = load_model_dir(base_dir).model.state_dict()
    delta = load_delta(second.delta_path)
    assert delta.metadata.local_round == 2 and delta.metadata.base_generation == 1
    assert delta.metadata.continues_round == 1  # it contains round 1's delta
    rebuilt = apply_delta(root, delta.tensors)
    tuned = load_model_dir(second.model_dir).model.state_dict()
    for name, weight in tuned.items():
        torch.testing.assert_close(rebuilt[name], weight, rtol=0, atol=1e-5)


def test_fine_tuning_needs_new_examples(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one new example"):
        _run(base_dir, tmp_path, new=[])
