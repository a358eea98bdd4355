from __future__ import annotations

import math

import numpy as np
import pytest

from dafne_node.model.metrics import dice_per_label, mean_dice


def test_dice_values() -> None:
    truth = np.zeros((2, 4, 4), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, :2] = 1          # 8 voxels
    pred[0, :1] = 1           # 4 voxels, all inside
    truth[1, :, :2] = 2
    pred[1, :, :2] = 2        # perfect
    pred[1, 0, 3] = 3         # label 3 only in prediction
    d = dice_per_label(pred, truth, [1, 2, 3, 4])
    assert d[1] == pytest.approx(2 * 4 / 12)
    assert d[2] == 1.0
    assert d[3] == 0.0
    assert math.isnan(d[4])   # absent from both: no opinion
    assert mean_dice(d) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_shape_mismatch_and_all_nan() -> None:
    with pytest.raises(ValueError, match="shape"):
        dice_per_label(np.zeros((2, 2)), np.zeros((2, 3)), [1])
    assert math.isnan(mean_dice({1: float("nan")}))
    assert math.isnan(mean_dice({}))
