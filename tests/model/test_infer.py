from __future__ import annotations

import numpy as np
import pytest
import torch

from dafne_node.model.infer import Segmenter, bf16_supported, resolve_precision
from dafne_node.model.manifest import LoadedModel


def test_segment_shape_dtype_labels(tiny_loaded: LoadedModel, synthetic_volume) -> None:
    pixels, _ = synthetic_volume(0, slices=5, rows=50, cols=70)
    seg = Segmenter.from_loaded(tiny_loaded, precision="fp32", max_batch_size=2)
    out = seg.segment(pixels, (1.3, 1.1))
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert set(np.unique(out)) <= set(range(7))
    assert seg.precision == "fp32"


def test_predict_proba_sums_to_one(tiny_loaded: LoadedModel, synthetic_volume) -> None:
    pixels, _ = synthetic_volume(1, slices=2, rows=40, cols=44)
    seg = Segmenter.from_loaded(tiny_loaded, precision="fp32")
    probs = seg.predict_proba(pixels, (2.5, 2.5))
    assert probs.shape == (2, 7, 40, 44)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probs.argmax(1), seg.segment(pixels, (2.5, 2.5)))


def test_segment_is_independent_of_batch_size(tiny_loaded: LoadedModel,
                                              synthetic_volume) -> None:
    pixels, _ = synthetic_volume(2, slices=5)
    one_by_one = Segmenter.from_loaded(tiny_loaded, precision="fp32", max_batch_size=1)
    batched = Segmenter.from_loaded(tiny_loaded, precision="fp32", max_batch_size=16)
    np.testing.assert_array_equal(one_by_one.segment(pixels, (2.0, 2.0)),
                                  batched.segment(pixels, (2.0, 2.0)))


@pytest.mark.skipif(not bf16_supported(), reason="CPU has no native bf16")
def test_bf16_matches_fp32(tiny_loaded: LoadedModel, synthetic_volume) -> None:
    # Give the random model confident, structured outputs: a bias towards classes by
    # intensity makes the label map non-trivial.
    pixels, _ = synthetic_volume(3, slices=4)
    fp32 = Segmenter.from_loaded(tiny_loaded, precision="fp32").segment(pixels, (2.0, 2.0))
    bf16 = Segmenter.from_loaded(tiny_loaded, precision="bf16")
    assert bf16.precision == "bf16"
    out = bf16.segment(pixels, (2.0, 2.0))
    assert np.mean(out == fp32) > 0.97


def test_precision_resolution() -> None:
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto") in ("bf16", "fp32")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8")  # type: ignore[arg-type]


def test_segmenter_does_not_touch_loaded_model(tiny_loaded: LoadedModel) -> None:
    before = {k: v.clone() for k, v in tiny_loaded.model.state_dict().items()}
    Segmenter.from_loaded(tiny_loaded, precision="fp32")
    for k, v in tiny_loaded.model.state_dict().items():
        assert torch.equal(v, before[k])
        assert v.is_contiguous()


def test_bad_input_refused(tiny_loaded: LoadedModel) -> None:
    seg = Segmenter.from_loaded(tiny_loaded, precision="fp32")
    with pytest.raises(ValueError, match="slices, rows, cols"):
        seg.segment(np.zeros((32, 32), np.uint16), (1.0, 1.0))
    with pytest.raises(ValueError, match="pixel_spacing"):
        seg.segment(np.zeros((1, 32, 32), np.uint16), (0.0, 1.0))
