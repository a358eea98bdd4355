"""The default model shipped in the package: present, verified, and as good as promised."""

from __future__ import annotations

import numpy as np
import pytest

from dafne_node.model.infer import Segmenter
from dafne_node.model.labels import LEG_MUSCLES
from dafne_node.model.manifest import MANIFEST_FILE, WEIGHTS_FILE, default_model_dir, load_model_dir
from dafne_node.model.metrics import dice_per_label, mean_dice

BUNDLED = default_model_dir()
pytestmark = pytest.mark.skipif(not (BUNDLED / MANIFEST_FILE).is_file(),
                                reason="bundled default model not built yet")


def test_bundled_model_loads_and_meets_acceptance() -> None:
    loaded = load_model_dir(BUNDLED)
    m = loaded.manifest
    assert m.name == "Dafne leg"
    assert m.generation == 1
    assert [(s.value, s.key) for s in m.labels] == [(lab.value, lab.key) for lab in LEG_MUSCLES]
    assert (BUNDLED / WEIGHTS_FILE).stat().st_size <= 20 * 1024 * 1024
    heldout = m.training["heldout_dice"]
    assert heldout["A"]["mean_dice"] >= 0.90
    for site in ("B", "C", "D"):
        assert 0.0 <= heldout[site]["mean_dice"] <= 1.0


def test_bundled_model_segments_a_heldout_phantom() -> None:
    phantom = pytest.importorskip("dafne_node.phantom")
    study = phantom.make_study(site="A", seed=3, slices=12)
    segmenter = Segmenter.from_loaded(load_model_dir(BUNDLED))
    pred = segmenter.segment(study.pixels, study.pixel_spacing)
    assert pred.shape == study.labels.shape and pred.dtype == np.uint8
    dice = mean_dice(dice_per_label(pred, study.labels, [lab.value for lab in LEG_MUSCLES]))
    assert dice >= 0.88
