from __future__ import annotations

import numpy as np
import pytest
import torch

from dafne_node.model.preprocess import (
    PreprocessConfig,
    from_model_grid,
    labels_to_model_grid,
    normalize_intensity,
    plan_geometry,
    to_model_grid,
)

CFG = PreprocessConfig(target_spacing_mm=2.0, input_shape=(64, 64))


def _blobs(rows: int, cols: int, slices: int = 3) -> np.ndarray:
    """Label map of large blocks (boundaries are a small fraction of the voxels)."""
    lab = np.zeros((slices, rows, cols), np.uint8)
    r, c = rows // 8, cols // 8
    lab[:, 2 * r:6 * r, 1 * c:3 * c] = 1
    lab[:, 1 * r:4 * r, 4 * c:7 * c] = 2
    lab[:, 5 * r:7 * r, 4 * c:6 * c] = 3
    return lab


def _round_trip(lab: np.ndarray, spacing: tuple[float, float], cfg: PreprocessConfig
                ) -> np.ndarray:
    norm = lab.astype(np.float32) / max(1, lab.max())
    geo = plan_geometry(norm, spacing, cfg)
    grid = labels_to_model_grid(lab, geo, 4)
    one_hot = torch.nn.functional.one_hot(grid, 4).permute(0, 3, 1, 2).float()
    bg = torch.tensor([1.0, 0, 0, 0])
    back = from_model_grid(one_hot, geo, fill=bg)
    assert back.shape == (lab.shape[0], 4, *lab.shape[1:])
    return back.argmax(1).numpy().astype(np.uint8)


@pytest.mark.parametrize(("shape", "spacing"), [
    ((64, 64), (2.0, 2.0)),        # identity grid: exact
    ((96, 80), (1.0, 1.25)),       # finer source, anisotropic, padded
    ((40, 48), (2.6, 2.6)),        # coarser source
    ((120, 100), (1.3, 1.3)),      # resampled larger than the grid along rows: cropped
])
def test_label_round_trip(shape: tuple[int, int], spacing: tuple[float, float]) -> None:
    lab = _blobs(*shape)
    back = _round_trip(lab, spacing, CFG)
    assert back.shape == lab.shape
    geo = plan_geometry(lab.astype(np.float32), spacing, CFG)
    fov = all(n <= m for n, m in zip(geo.resampled_shape, CFG.input_shape, strict=True))
    disagreement = np.mean(back != lab)
    if spacing == (2.0, 2.0):
        assert disagreement == 0
    elif fov:
        assert disagreement < 0.03  # boundary voxels only
    # Labels are never moved: the centre of each block survives.
    for value in (1, 2, 3):
        rr, cc = np.nonzero(lab[0] == value)
        centre = (int(rr.mean()), int(cc.mean()))
        if fov:
            assert back[0][centre] == value


def test_crop_centres_on_body_and_fills_background() -> None:
    # 200 x 60 source at 1 mm -> 100 x 30 on a 2 mm grid; 64 rows visible.
    img = np.zeros((1, 200, 60), np.float32)
    img[:, 130:190, 10:50] = 1.0  # body low in the image
    geo = plan_geometry(img, (1.0, 1.0), CFG)
    assert geo.resampled_shape == (100, 30)
    # Body spans resampled rows 65..95; the 64-row window must contain it.
    start = -geo.offset[0]
    assert start <= 65 and start + 64 >= 95
    x = to_model_grid(img, geo)
    assert x.shape == (1, 1, 64, 64)
    assert float(x.sum()) == pytest.approx(30 * 20, rel=0.05)
    probs = torch.zeros(1, 2, 64, 64)
    probs[:, 1] = 1.0  # network says "foreground" everywhere it looked
    back = from_model_grid(probs, geo, fill=torch.tensor([1.0, 0.0]))
    assert back.shape == (1, 2, 200, 60)
    # Rows never seen (cropped away) are background, the body rows are foreground.
    assert back[0, 0, :20].min() == 1.0
    assert back[0, 1, 130:190].min() > 0.99


def test_normalize_intensity_range_and_invariance() -> None:
    rng = np.random.default_rng(0)
    vol = rng.gamma(2.0, 100.0, size=(3, 32, 32)).astype(np.float32)
    a = normalize_intensity(vol, CFG)
    b = normalize_intensity(vol * 7.5 + 300, CFG)  # other scanner gain and offset
    assert a.dtype == np.float32 and a.shape == vol.shape
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_allclose(a, b, atol=1e-4)
    flat = normalize_intensity(np.full((2, 8, 8), 5, np.uint16), CFG)
    assert not flat.any()


def test_to_model_grid_shape_and_geometry_checks() -> None:
    vol = np.ones((2, 50, 70), np.float32)
    geo = plan_geometry(vol, (1.5, 1.5), CFG)
    assert to_model_grid(vol, geo).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="do not match"):
        to_model_grid(np.ones((2, 51, 70), np.float32), geo)
    with pytest.raises(ValueError, match="network grid"):
        from_model_grid(torch.zeros(2, 3, 32, 32), geo)


@pytest.mark.parametrize("bad", [(0.0, 1.0), (1.0, -2.0), (float("nan"), 1.0), (1.0,)])
def test_bad_spacing_refused(bad: tuple) -> None:
    with pytest.raises(ValueError, match="pixel_spacing"):
        plan_geometry(np.ones((1, 8, 8), np.float32), bad, CFG)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="target_spacing_mm"):
        PreprocessConfig(target_spacing_mm=0)
    with pytest.raises(ValueError, match="percentile"):
        PreprocessConfig(percentile_low=99, percentile_high=1)
