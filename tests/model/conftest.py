"""Shared fixtures for the ML engine tests: tiny models and synthetic volumes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dafne_node.model.architectures import build_model
from dafne_node.model.manifest import LoadedModel, load_model_dir, save_model_dir
from dafne_node.model.preprocess import PreprocessConfig

TINY_PARAMS = {"base_channels": 4, "depth": 2, "max_channels": 16, "groups": 2}
TINY_PREPROCESSING = PreprocessConfig(target_spacing_mm=2.0, input_shape=(64, 64))


def _synthetic_volume(seed: int, slices: int = 4, rows: int = 60, cols: int = 72
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Six ellipses of distinct brightness, labels 1..6, on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    labels = np.zeros((slices, rows, cols), np.uint8)
    image = np.zeros((slices, rows, cols), np.float32)
    for s in range(slices):
        for k in range(1, 7):
            cy = rng.uniform(0.3, 0.7) * rows
            cx = (k - 0.5) / 6 * cols
            ry, rx = rng.uniform(5, 10), rng.uniform(3, 5)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            labels[s][inside] = k
            image[s][inside] = 200 + 100 * k
    image += rng.normal(0, 15, image.shape)
    return np.clip(image, 0, None).astype(np.uint16), labels


@pytest.fixture()
def synthetic_volume() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Factory: ``synthetic_volume(seed, slices=4, rows=60, cols=72) -> (pixels, labels)``."""
    return _synthetic_volume


@pytest.fixture()
def tiny_params() -> dict[str, int]:
    return dict(TINY_PARAMS)


@pytest.fixture()
def tiny_preprocessing() -> PreprocessConfig:
    return TINY_PREPROCESSING


@pytest.fixture()
def tiny_model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("unet2d-res", TINY_PARAMS)
    path = tmp_path / "tiny"
    save_model_dir(model, path, name="tiny", generation=1, preprocessing=TINY_PREPROCESSING)
    return path


@pytest.fixture()
def tiny_loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model_dir(tiny_model_dir)
