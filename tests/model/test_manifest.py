from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dafne_node.model.architectures import build_model
from dafne_node.model.labels import LEG_MUSCLES
from dafne_node.model.manifest import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ModelError,
    default_model_dir,
    file_sha256,
    load_manifest,
    load_model_dir,
    save_model_dir,
)


def _edit_manifest(path: Path, edit) -> None:
    data = json.loads((path / MANIFEST_FILE).read_text())
    edit(data)
    (path / MANIFEST_FILE).write_text(json.dumps(data))


def test_round_trip(tiny_model_dir: Path, tiny_params: dict, tiny_preprocessing) -> None:
    loaded = load_model_dir(tiny_model_dir)
    m = loaded.manifest
    assert m.format_version == 1
    assert m.generation == 1
    assert m.architecture.id == "unet2d-res"
    assert m.architecture.params["base_channels"] == 4
    assert [label.key for label in m.labels] == [label.key for label in LEG_MUSCLES]
    assert m.labels[0].type.value == LEG_MUSCLES[0].type_code.value
    assert m.labels[0].category.meaning == "Anatomical Structure"
    assert loaded.preprocessing == tiny_preprocessing
    assert m.weights.sha256 == file_sha256(tiny_model_dir / WEIGHTS_FILE)
    assert not loaded.model.training
    # Weights survive the round trip exactly.
    torch.manual_seed(0)
    ref = build_model("unet2d-res", tiny_params).state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_save_replaces_and_fp16(tmp_path: Path, tiny_params: dict, tiny_preprocessing) -> None:
    model = build_model("unet2d-res", tiny_params)
    path = tmp_path / "m"
    save_model_dir(model, path, name="a", generation=1, preprocessing=tiny_preprocessing)
    save_model_dir(model, path, name="b", generation=2, preprocessing=tiny_preprocessing,
                   weights_dtype=torch.float16, training={"dice": float("nan"), "n": 3})
    loaded = load_model_dir(path)
    assert loaded.manifest.name == "b"
    assert loaded.manifest.weights.dtype == "float16"
    assert loaded.manifest.training == {"dice": None, "n": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left
    assert next(iter(loaded.model.parameters())).dtype == torch.float32


def test_tampered_weights_refused(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="do not match the manifest sha256") as info:
        load_model_dir(tiny_model_dir)
    assert "expected" in str(info.value) and "got" in str(info.value)


@pytest.mark.parametrize("key", ["architecture", "weights", "labels", "preprocessing",
                                 "generation"])
def test_missing_key_named(tiny_model_dir: Path, key: str) -> None:
    _edit_manifest(tiny_model_dir, lambda d: d.pop(key))
    with pytest.raises(ModelError, match=f"missing required key '{key}'"):
        load_model_dir(tiny_model_dir)


def test_missing_nested_key_named(tiny_model_dir: Path) -> None:
    _edit_manifest(tiny_model_dir, lambda d: d["preprocessing"].pop("target_spacing_mm"))
    with pytest.raises(ModelError, match=r"preprocessing\.target_spacing_mm"):
        load_model_dir(tiny_model_dir)


def test_unknown_architecture_refused(tiny_model_dir: Path) -> None:
    _edit_manifest(tiny_model_dir, lambda d: d["architecture"].update(id="evil-net"))
    with pytest.raises(ModelError, match="unknown architecture 'evil-net'"):
        load_model_dir(tiny_model_dir)


def test_unknown_param_refused(tiny_model_dir: Path) -> None:
    _edit_manifest(tiny_model_dir, lambda d: d["architecture"]["params"].update(hidden=3))
    with pytest.raises(ModelError, match="'hidden'"):
        load_model_dir(tiny_model_dir)


def test_shape_mismatch_refused(tiny_model_dir: Path) -> None:
    # Manifest says wider network than the weights hold; hash stays valid.
    _edit_manifest(tiny_model_dir, lambda d: d["architecture"]["params"].update(base_channels=8))
    with pytest.raises(ModelError, match="shape"):
        load_model_dir(tiny_model_dir)


def test_extra_tensor_refused(tiny_model_dir: Path) -> None:
    loaded = load_model_dir(tiny_model_dir)
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    state["backdoor.weight"] = torch.zeros(3)
    weights = tiny_model_dir / WEIGHTS_FILE
    save_file(state, str(weights))
    _edit_manifest(tiny_model_dir, lambda d: d["weights"].update(sha256=file_sha256(weights)))
    with pytest.raises(ModelError, match=re.escape("unexpected ['backdoor.weight']")):
        load_model_dir(tiny_model_dir)


def test_pickle_weights_refused(tiny_model_dir: Path) -> None:
    # A pickle named like the manifest says, with a matching hash: still refused, never
    # unpickled.
    weights = tiny_model_dir / WEIGHTS_FILE
    weights.write_bytes(pickle.dumps({"stem.0.weight": [1, 2, 3]}))
    _edit_manifest(tiny_model_dir, lambda d: d["weights"].update(sha256=file_sha256(weights)))
    with pytest.raises(ModelError, match="safetensors"):
        load_model_dir(tiny_model_dir)


def test_pickle_file_name_refused(tiny_model_dir: Path) -> None:
    (tiny_model_dir / WEIGHTS_FILE).unlink()
    (tiny_model_dir / "model.pt").write_bytes(pickle.dumps({}))
    _edit_manifest(tiny_model_dir, lambda d: d["weights"].update(file="model.pt"))
    with pytest.raises(ModelError, match="pickle"):
        load_model_dir(tiny_model_dir)


def test_pickle_next_to_missing_weights_mentioned(tiny_model_dir: Path) -> None:
    (tiny_model_dir / WEIGHTS_FILE).unlink()
    (tiny_model_dir / "model.pth").write_bytes(pickle.dumps({}))
    with pytest.raises(ModelError, match="pickle files are refused"):
        load_model_dir(tiny_model_dir)


def test_not_json_and_missing(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    (tiny_model_dir / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_manifest(tiny_model_dir)
    (tiny_model_dir / MANIFEST_FILE).unlink()
    with pytest.raises(ModelError, match=r"no manifest\.json"):
        load_model_dir(tiny_model_dir)


def test_wrong_version_and_label_count(tiny_model_dir: Path) -> None:
    _edit_manifest(tiny_model_dir, lambda d: d["labels"].pop())
    with pytest.raises(ModelError, match="5 labels"):
        load_model_dir(tiny_model_dir)
    _edit_manifest(tiny_model_dir, lambda d: d.update(format_version=99))
    with pytest.raises(ModelError, match="format_version 99"):
        load_model_dir(tiny_model_dir)


def test_model_error_is_value_error() -> None:
    assert issubclass(ModelError, ValueError)


def test_default_model_dir_location() -> None:
    path = default_model_dir()
    assert path.parts[-3:] == ("dafne_node", "models", "leg-default")


def test_input_shape_must_fit_depth(tiny_model_dir: Path) -> None:
    _edit_manifest(tiny_model_dir, lambda d: d["preprocessing"].update(input_shape=[64, 66]))
    with pytest.raises(ModelError, match="multiples of 4"):
        load_model_dir(tiny_model_dir)
