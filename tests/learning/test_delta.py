"""Weight deltas: fp16 safetensors that turn the base generation into the fine-tuned model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dafne_node.learning.delta import (
    DELTA_DTYPE,
    DeltaError,
    DeltaMetadata,
    apply_delta,
    compute_delta,
    load_delta,
    read_delta_metadata,
    save_delta,
)
from dafne_node.model.architectures import build_model
from tests.model.conftest import TINY_PARAMS


def _states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    base = build_model("unet2d-res", TINY_PARAMS).state_dict()
    gen = torch.Generator().manual_seed(1)
    # Changes of the size fine-tuning makes, spanning a few orders of magnitude.
    tuned = {k: v + torch.randn(v.shape, generator=gen) * 10 ** -torch.randint(
        1, 5, v.shape, generator=gen).float() for k, v in base.items()}
    return base, tuned


def _metadata(**overrides) -> DeltaMetadata:
    values = {"model_name": "tiny", "architecture": "unet2d-res", "base_generation": 1,
              "base_sha256": "ab" * 32, "local_round": 1, "num_samples": 12,
              "num_slices": 480, "metrics": {"heldout_dice_after": 0.9}, **overrides}
    return DeltaMetadata(**values)


def test_base_plus_delta_is_the_fine_tuned_model_within_fp16() -> None:
    base, tuned = _states()
    delta = compute_delta(base, tuned)
    assert all(t.dtype == DELTA_DTYPE for t in delta.values())
    applied = apply_delta(base, delta)
    for name, target in tuned.items():
        change = (target - base[name]).abs()
        error = (applied[name] - target).abs()
        assert applied[name].dtype == base[name].dtype
        # fp16 keeps 11 significant bits of each change (plus fp32 rounding of the sum).
        bound = change * 2.0**-11 + base[name].abs() * 2.0**-23 + 1e-7
        assert bool((error <= bound).all()), name
    model = build_model("unet2d-res", TINY_PARAMS)
    model.load_state_dict(applied)  # ready to load


def test_apply_does_not_modify_its_inputs() -> None:
    base, tuned = _states()
    before = {k: v.clone() for k, v in base.items()}
    delta = compute_delta(base, tuned)
    apply_delta(base, delta)
    assert all(torch.equal(before[k], base[k]) for k in base)


def test_save_and_load(tmp_path: Path) -> None:
    base, tuned = _states()
    delta = compute_delta(base, tuned)
    path = save_delta(tmp_path / "d" / "delta.safetensors", delta, _metadata())
    loaded = load_delta(path)
    assert loaded.metadata == read_delta_metadata(path)
    assert loaded.metadata.base_generation == 1 and loaded.metadata.num_samples == 12
    assert loaded.metadata.metrics == {"heldout_dice_after": 0.9}
    assert all(torch.equal(loaded.tensors[k], delta[k]) for k in delta)
    # A plain safetensors file: JSON header with fp16 tensors and the metadata as JSON.
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    assert json.loads(header["__metadata__"]["metadata"])["base_sha256"] == "ab" * 32
    assert [p.name for p in path.parent.iterdir()] == ["delta.safetensors"]
    # Two bytes per weight after the header: half the size of the fp32 weights.
    assert len(raw) - 8 - size == sum(t.numel() * 2 for t in base.values())


def test_nan_and_inf_are_refused(tmp_path: Path) -> None:
    base, tuned = _states()
    name = next(iter(tuned))
    tuned[name] = tuned[name].clone()
    tuned[name].view(-1)[0] = float("nan")
    with pytest.raises(DeltaError, match=f"fine-tuned weights: tensor '{name}' contains NaN"):
        compute_delta(base, tuned)

    delta = compute_delta(*_states())
    delta[name] = delta[name].clone()
    delta[name].view(-1)[0] = float("inf")
    with pytest.raises(DeltaError, match=f"tensor '{name}' contains NaN or Inf"):
        apply_delta(base, delta)
    with pytest.raises(DeltaError, match="contains NaN or Inf"):
        save_delta(tmp_path / "x.safetensors", delta, _metadata())
    # A file written by someone else with Inf inside is refused on load.
    save_file(delta, str(tmp_path / "bad.safetensors"),
              metadata={"format": "dafne-weight-delta/1",
                        "metadata": _metadata().model_dump_json()})
    with pytest.raises(DeltaError, match=f"'{name}' contains NaN or Inf"):
        load_delta(tmp_path / "bad.safetensors")


def test_fp16_overflow_is_refused() -> None:
    base, tuned = _states()
    name = next(iter(tuned))
    tuned[name] = tuned[name] + 1e5
    with pytest.raises(DeltaError, match="fp16 overflow"):
        compute_delta(base, tuned)


def test_shape_and_name_mismatches_are_refused() -> None:
    base, tuned = _states()
    delta = compute_delta(base, tuned)
    name = next(iter(delta))
    wrong_shape = {**delta, name: torch.zeros(3, dtype=DELTA_DTYPE)}
    with pytest.raises(DeltaError, match=f"tensor '{name}' has shape \\(3,\\)"):
        apply_delta(base, wrong_shape)
    missing = {k: v for k, v in delta.items() if k != name}
    with pytest.raises(DeltaError, match=f"missing \\['{name}'\\]"):
        apply_delta(base, missing)
    with pytest.raises(DeltaError, match="unexpected \\['extra'\\]"):
        compute_delta(base, {**tuned, "extra": torch.zeros(1)})


def test_files_that_are_not_deltas_are_refused(tmp_path: Path) -> None:
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95junk")
    with pytest.raises(DeltaError, match="not a readable safetensors"):
        load_delta(tmp_path / "pickle.safetensors")
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, str(tmp_path / "weights.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(DeltaError, match="is not a weight delta"):
        read_delta_metadata(tmp_path / "weights.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "fp32.safetensors"),
              metadata={"format": "dafne-weight-delta/1",
                        "metadata": _metadata().model_dump_json()})
    with pytest.raises(DeltaError, match=r"must be torch\.float16"):
        load_delta(tmp_path / "fp32.safetensors")
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, str(tmp_path / "meta.safetensors"),
              metadata={"format": "dafne-weight-delta/1", "metadata": '{"model_name": 1}'})
    with pytest.raises(DeltaError, match="invalid metadata"):
        load_delta(tmp_path / "meta.safetensors")
