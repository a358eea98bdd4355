from __future__ import annotations

import numpy as np
import pytest
import torch

from dafne_node.model.architectures import build_model
from dafne_node.model.infer import Segmenter
from dafne_node.model.train import TrainingExample, evaluate, train


def _examples(synthetic_volume, seeds) -> list[TrainingExample]:
    return [TrainingExample(*synthetic_volume(s, slices=4), pixel_spacing=(2.0, 2.0))
            for s in seeds]


def test_tiny_training_reduces_loss_and_learns(synthetic_volume, tiny_params,
                                               tiny_preprocessing) -> None:
    torch.manual_seed(0)
    model = build_model("unet2d-res", {**tiny_params, "base_channels": 8, "max_channels": 32,
                                       "groups": 4})
    examples = _examples(synthetic_volume, range(4))
    seg_before = Segmenter(model, tiny_preprocessing, precision="fp32")
    before = evaluate(seg_before, examples).mean_dice
    report = train(model, examples, preprocessing=tiny_preprocessing, steps=100, lr=3e-3,
                   batch_size=4, seed=0, augment=False, progress=False)
    assert report.steps == 100 and report.slices == 16
    assert report.final_loss < 0.75 * report.initial_loss
    assert not model.training
    after = evaluate(Segmenter(model, tiny_preprocessing, precision="fp32"),
                     examples)
    assert after.mean_dice > before + 0.3, (before, after.mean_dice)
    assert set(after.per_label) == {"soleus", "gastrocnemius_medial", "gastrocnemius_lateral",
                                    "tibialis_anterior", "extensor_digitorum_longus",
                                    "peroneus"}


def test_training_is_deterministic(synthetic_volume, tiny_params, tiny_preprocessing) -> None:
    examples = _examples(synthetic_volume, range(2))
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model("unet2d-res", tiny_params)
        train(model, examples, preprocessing=tiny_preprocessing, steps=3, batch_size=2,
              seed=5, progress=False)
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-6)


def test_train_argument_checks(synthetic_volume, tiny_params, tiny_preprocessing) -> None:
    model = build_model("unet2d-res", tiny_params)
    examples = _examples(synthetic_volume, [0])
    with pytest.raises(ValueError, match="exactly one"):
        train(model, examples, preprocessing=tiny_preprocessing, progress=False)
    with pytest.raises(ValueError, match="no training examples"):
        train(model, [], preprocessing=tiny_preprocessing, steps=1, progress=False)
    with pytest.raises(ValueError, match="same shape"):
        TrainingExample(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), (1.0, 1.0))


def test_epochs_counts_slices(synthetic_volume, tiny_params, tiny_preprocessing) -> None:
    model = build_model("unet2d-res", tiny_params)
    report = train(model, _examples(synthetic_volume, [0, 1]), preprocessing=tiny_preprocessing,
                   epochs=1, batch_size=3, progress=False)
    assert report.steps == 3  # ceil(8 slices / 3)
