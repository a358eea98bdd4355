"""A locally fine-tuned model is told apart from the federation's root generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dafne_node.model.architectures import build_model
from dafne_node.model.manifest import (
    MANIFEST_FILE,
    ModelError,
    default_model_dir,
    load_manifest,
    load_model_dir,
    save_model_dir,
)


def test_root_generation_has_no_local_round_key(tiny_model_dir: Path) -> None:
    raw = json.loads((tiny_model_dir / MANIFEST_FILE).read_text())
    assert "local_round" not in raw  # a root manifest is written exactly as before
    manifest = load_manifest(tiny_model_dir)
    assert manifest.local_round is None and manifest.version_label == "g1"


def test_bundled_manifest_without_the_key_still_loads() -> None:
    manifest = load_manifest(default_model_dir())
    assert manifest.local_round is None
    assert manifest.version_label == f"g{manifest.generation}"


def test_local_round_round_trips(tmp_path: Path, tiny_params, tiny_preprocessing) -> None:
    torch.manual_seed(0)
    model = build_model("unet2d-res", tiny_params)
    save_model_dir(model, tmp_path / "m", name="tiny", generation=4,
                   preprocessing=tiny_preprocessing, local_round=3)
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.manifest.local_round == 3
    assert loaded.manifest.version_label == "g4-local3"


def test_local_round_must_be_positive(tiny_model_dir: Path) -> None:
    path = tiny_model_dir / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["local_round"] = 0
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="local_round"):
        load_manifest(tiny_model_dir)
