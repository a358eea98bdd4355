"""The update wire format: compact deltas that decode as promised; hostile bytes refused."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dafne_node.learning.delta import DeltaMetadata
from dafne_node.learning.update import (
    UPDATE_FORMAT,
    Encoding,
    TensorInfo,
    UpdateFormatError,
    UpdateMetadata,
    UpdateTooLargeError,
    check_matches,
    decode_update,
    encode_update,
)
from dafne_node.model.manifest import default_model_dir, load_model_dir

META = DeltaMetadata(model_name="Dafne leg", architecture="unet2d-res", base_generation=3,
                     base_sha256="ab" * 32, local_round=2, num_samples=12, num_slices=480,
                     metrics={"dice_before": 0.81, "dice_after": 0.84})


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    """A big tensor (compressed), one at the size threshold, and small ones (always fp16)."""
    gen = torch.Generator().manual_seed(seed)
    return {"big.weight": torch.randn(64, 80, generator=gen) * 1e-3,
            "edge.weight": torch.randn(4096, generator=gen) * 1e-2,
            "big.bias": torch.randn(64, generator=gen) * 1e-4,
            "scalar": torch.tensor(0.25)}


def _parts(payload: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    (size,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + size])
    return load_safetensors(payload), json.loads(header["__metadata__"]["metadata"])


def _pack(tensors: dict[str, torch.Tensor], metadata: dict, fmt: str = UPDATE_FORMAT) -> bytes:
    return save_safetensors(tensors, metadata={"format": fmt, "metadata": json.dumps(metadata)})


def _raw(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# Round trips ------------------------------------------------------------------------------


def test_fp16_round_trip_and_rounding_residual() -> None:
    delta = _delta()
    encoded = encode_update(delta, META, encoding=Encoding.FP16)
    decoded = decode_update(encoded.payload)
    assert decoded.size_bytes == len(encoded.payload)
    assert decoded.metadata == encoded.metadata
    for name, tensor in delta.items():
        assert decoded.tensors[name].dtype == torch.float32
        assert torch.equal(decoded.tensors[name], tensor.half().float())
        assert torch.equal(encoded.residual[name], tensor - tensor.half().float())
        assert encoded.metadata.tensors[name] == TensorInfo(shape=list(tensor.shape),
                                                            encoding=Encoding.FP16)


def test_int8_error_is_at_most_half_a_step() -> None:
    delta = _delta()
    encoded = encode_update(delta, META, encoding="int8")
    stored, _ = _parts(encoded.payload)
    decoded = decode_update(encoded.payload).tensors
    for name in ("big.weight", "edge.weight"):
        assert encoded.metadata.tensors[name].encoding == Encoding.INT8
        assert stored[f"{name}.q"].dtype == torch.int8
        assert tuple(stored[f"{name}.q"].shape) == tuple(delta[name].shape)
        scale = float(stored[f"{name}.scale"][0])
        assert scale == pytest.approx(float(delta[name].abs().max()) / 127, rel=1e-6)
        error = (decoded[name] - delta[name]).abs().max()
        assert 0 < error <= scale / 2 * (1 + 1e-5)
        assert torch.allclose(encoded.residual[name], delta[name] - decoded[name])
    # Small tensors travel as fp16 whatever the encoding.
    assert encoded.metadata.tensors["big.bias"].encoding == Encoding.FP16
    assert torch.equal(decoded["big.bias"], delta["big.bias"].half().float())


def test_topk_keeps_exactly_the_largest_entries() -> None:
    # Distinct magnitudes, so "the 10 % largest" is one set.
    values = (torch.randperm(5120, generator=torch.Generator().manual_seed(3)).float() + 1)
    signs = torch.where(torch.arange(5120) % 3 == 0, -1.0, 1.0)
    delta = {"w": (values * signs * 1e-5).reshape(64, 80)}
    encoded = encode_update(delta, META, density=0.1)
    stored, metadata = _parts(encoded.payload)
    assert metadata["tensors"] == {"w": {"shape": [64, 80], "encoding": "topk-int8"}}
    assert sorted(stored) == ["w.mask", "w.q", "w.scale"]
    assert stored["w.mask"].dtype == torch.uint8 and stored["w.mask"].shape == (640,)
    assert stored["w.q"].dtype == torch.int8 and stored["w.q"].shape == (512,)
    decoded = decode_update(encoded.payload).tensors["w"]
    kept = set(torch.nonzero(decoded.reshape(-1)).reshape(-1).tolist())
    largest = set(torch.topk(values, 512).indices.tolist())
    assert kept == largest
    # The mask is np.packbits (little bit order) of the row-major flattened tensor.
    bits = np.unpackbits(stored["w.mask"].numpy(), bitorder="little")
    assert set(np.flatnonzero(bits).tolist()) == largest
    scale = float(stored["w.scale"][0])
    flat = delta["w"].reshape(-1)
    index = sorted(largest)
    assert (decoded.reshape(-1)[index] - flat[index]).abs().max() <= scale / 2 * (1 + 1e-5)
    # Everything not sent (and the rounding of what was) is in the residual.
    assert torch.allclose(encoded.residual["w"] + decoded, delta["w"], atol=1e-9)
    assert float(encoded.residual["w"].reshape(-1)[sorted(set(range(5120)) - largest)]
                 .abs().min()) > 0


def test_error_feedback_sends_everything_eventually() -> None:
    rounds = 25
    deltas = [_delta(seed) for seed in range(rounds)]
    residual = None
    received = {name: torch.zeros_like(t) for name, t in deltas[0].items()}
    without_feedback = {name: torch.zeros_like(t) for name, t in deltas[0].items()}
    for delta in deltas:
        encoded = encode_update(delta, META, density=0.1, residual=residual)
        residual = encoded.residual
        for name, tensor in decode_update(encoded.payload).tensors.items():
            received[name] += tensor
        for name, tensor in decode_update(encode_update(delta, META).payload).tensors.items():
            without_feedback[name] += tensor
    assert residual is not None
    total = {name: sum(d[name] for d in deltas) for name in deltas[0]}
    for name in ("big.weight", "edge.weight"):
        # What was received plus what is still held back is exactly what was produced ...
        assert torch.allclose(received[name] + residual[name], total[name], atol=1e-6)
        # ... and what is held back stays small, so the received sum tracks the true sum,
        # unlike plain top-k, which loses most of each delta for good.
        relative = float((received[name] - total[name]).norm() / total[name].norm())
        plain = float((without_feedback[name] - total[name]).norm() / total[name].norm())
        assert relative < 0.35 < plain, (name, relative, plain)


def test_bundled_model_update_is_a_small_fraction_of_the_model() -> None:
    state = load_model_dir(default_model_dir()).model.state_dict()
    fp32_bytes = sum(t.numel() * 4 for t in state.values())
    gen = torch.Generator().manual_seed(0)
    delta = {name: torch.randn(t.shape, generator=gen) * 1e-3 for name, t in state.items()}
    topk = encode_update(delta, META)  # the default: density 0.2
    sparser = encode_update(delta, META, density=0.1)
    int8 = encode_update(delta, META, encoding=Encoding.INT8)
    assert len(topk.payload) <= 0.10 * fp32_bytes  # about 8.7 %
    assert len(sparser.payload) <= 0.07 * fp32_bytes  # about 6.2 %
    assert len(int8.payload) <= 0.26 * fp32_bytes  # about 25 %
    decoded = decode_update(topk.payload, max_bytes=len(topk.payload))
    check_matches(decoded.tensors, state)
    assert set(decoded.metadata.tensors) == set(state)


def test_metadata_comes_from_the_delta() -> None:
    meta = META.model_copy(update={"metrics": {"dice_after": float("nan"), "n": 3}})
    encoded = encode_update(_delta(), meta)
    metadata = decode_update(encoded.payload).metadata
    assert metadata.model_name == "Dafne leg" and metadata.architecture == "unet2d-res"
    assert (metadata.base_generation, metadata.num_samples, metadata.num_slices) == (3, 12, 480)
    assert metadata.base_sha256 == "ab" * 32
    assert metadata.metrics == {"dice_after": None, "n": 3}  # NaN travels as null
    assert UpdateMetadata.from_delta(META, {}).tensors == {}


# Refusals when encoding --------------------------------------------------------------------


@pytest.mark.parametrize(("change", "match"), [
    ({"big.weight": torch.full((64, 80), float("nan"))}, "'big.weight' contains NaN"),
    ({"scalar": torch.tensor(float("inf"))}, "'scalar' contains NaN"),
    ({"big.bias": torch.full((64,), 1e6)}, "'big.bias' does not fit fp16"),
    ({"big.bias": torch.ones(64, dtype=torch.int64)}, "'big.bias' is not floating point"),
])
def test_encode_refuses_bad_tensors(change: dict, match: str) -> None:
    with pytest.raises(UpdateFormatError, match=match):
        encode_update({**_delta(), **change}, META)


def test_encode_refuses_bad_arguments() -> None:
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density"):
            encode_update(_delta(), META, density=density)
    with pytest.raises(ValueError, match="bf16"):
        encode_update(_delta(), META, encoding="bf16")
    with pytest.raises(UpdateFormatError, match="residual does not match the delta: "
                                               "missing \\['scalar'\\]"):
        encode_update(_delta(), META, residual={k: v for k, v in _delta().items()
                                                 if k != "scalar"})
    for field in ({"base_generation": 0}, {"num_samples": 0}):
        with pytest.raises(UpdateFormatError, match=next(iter(field))):
            encode_update(_delta(), META.model_copy(update=field))
    with pytest.raises(UpdateFormatError, match="clash"):
        encode_update({"w": torch.zeros(4096), "w.q": torch.zeros(3)}, META,
                      encoding=Encoding.INT8)


def test_density_one_keeps_every_entry() -> None:
    stored, _ = _parts(encode_update(_delta(), META, density=1.0).payload)
    assert bool((stored["big.weight.mask"] == 0xFF).all())
    assert stored["big.weight.q"].shape == (5120,)


# Refusals when decoding --------------------------------------------------------------------


def _valid() -> tuple[dict[str, torch.Tensor], dict]:
    return _parts(encode_update(_delta(), META, encoding=Encoding.TOPK_INT8, density=0.1).payload)


def _with(replace: dict | None = None, drop: tuple[str, ...] = (), **metadata) -> bytes:
    """A valid payload with tensors replaced or dropped and metadata fields overridden."""
    stored, meta = _valid()
    stored = {k: v for k, v in {**stored, **(replace or {})}.items() if k not in drop}
    return _pack(stored, {**meta, **metadata})


def _tensors_meta(**changes) -> dict:
    _, meta = _valid()
    return {**meta["tensors"], **changes}


def _flip_a_mask_bit() -> bytes:
    stored, meta = _valid()
    mask = stored["big.weight.mask"].clone()
    mask[0] ^= 1
    return _pack({**stored, "big.weight.mask": mask}, meta)


def _metadata_without(field: str) -> bytes:
    stored, meta = _valid()
    return _pack(stored, {k: v for k, v in meta.items() if k != field})


def _header_length(value: int) -> bytes:
    payload = encode_update(_delta(), META).payload
    return struct.pack("<Q", value) + payload[8:]


def _padding_bits() -> bytes:
    """A tensor of 4100 entries: its mask's last byte has 4 padding bits, one of them set."""
    delta = {"w": torch.arange(4100, dtype=torch.float32)}
    stored, meta = _parts(encode_update(delta, META, density=0.5).payload)
    mask = stored["w.mask"].clone()
    mask[-1] |= 0x80
    q = torch.cat([stored["w.q"], torch.ones(1, dtype=torch.int8)])
    return _pack({**stored, "w.mask": mask, "w.q": q}, meta)


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "not safetensors"),
    "truncated": (lambda: encode_update(_delta(), META).payload[:-10], "not readable"),
    "truncated header": (lambda: encode_update(_delta(), META).payload[:50], "header length"),
    "huge header length": (lambda: _header_length(2**63), "header length"),
    "header beyond 16 MiB": (lambda: _header_length(17 << 20) + bytes(17 << 20),
                             "header length"),
    "header not JSON": (lambda: struct.pack("<Q", 5) + b"{{{{{", "not valid JSON"),
    "header not UTF-8": (lambda: struct.pack("<Q", 2) + b"\xff\xfe", "UTF-8"),
    "header a list": (lambda: _raw([]), "not a JSON object"),  # type: ignore[arg-type]
    "pickle": (lambda: b"\x80\x04\x95" + bytes(40), "not safetensors"),
    "no metadata": (lambda: _raw({}), "format None"),
    "wrong format": (lambda: _pack(*_valid(), fmt="dafne-weight-delta/1"),
                     "format 'dafne-weight-delta/1'"),
    "metadata not JSON": (lambda: _raw({"__metadata__": {"format": UPDATE_FORMAT,
                                                         "metadata": "{nope"}}),
                          "metadata is not valid JSON"),
    "metadata NaN": (lambda: _raw({"__metadata__": {"format": UPDATE_FORMAT,
                                                    "metadata": '{"metrics": NaN}'}}),
                     "NaN is not a JSON number"),
    "metadata missing field": (lambda: _metadata_without("base_sha256"), "base_sha256"),
    "metadata extra field": (lambda: _with(secret="x"), "secret"),
    "metadata bad generation": (lambda: _with(base_generation=0), "base_generation"),
    "metadata bad encoding": (lambda: _with(tensors=_tensors_meta(
        scalar={"shape": [], "encoding": "zip"})), "encoding"),
    "missing key": (lambda: _with(drop=("big.weight.scale",)),
                    "missing \\['big.weight.scale'\\]"),
    "extra key": (lambda: _with({"patient_name": torch.zeros(1)}),
                  "unexpected \\['patient_name'\\]"),
    "tensor not in metadata": (lambda: _with(tensors={
        k: v for k, v in _tensors_meta().items() if k != "scalar"}),
        "unexpected \\['scalar'\\]"),
    "q not int8": (lambda: _with({"big.weight.q": torch.zeros(512, dtype=torch.int16)}),
                   "'big.weight.q' has dtype 'I16', expected I8"),
    "fp16 tensor as fp32": (lambda: _with({"big.bias": torch.zeros(64)}),
                            "'big.bias.*dtype 'F32', expected F16"),
    "mask not uint8": (lambda: _with({"big.weight.mask": torch.zeros(640, dtype=torch.int8)}),
                       "'big.weight.mask' has dtype 'I8'"),
    "scale float64": (lambda: _with({"edge.weight.scale": torch.ones(1, dtype=torch.float64)}),
                      "'edge.weight.scale' has dtype 'F64'"),
    "fp16 wrong shape": (lambda: _with({"big.bias": torch.zeros(65, dtype=torch.float16)}),
                         "'big.bias' has shape \\(65,\\)"),
    "metadata shape differs": (lambda: _with(tensors=_tensors_meta(
        scalar={"shape": [1], "encoding": "fp16"})), "'scalar' has shape \\(\\)"),
    "wrong mask length": (lambda: _with({"big.weight.mask": torch.zeros(639, dtype=torch.uint8)}),
                          "mask has shape \\(639,\\), expected \\(640,\\)"),
    "huge metadata shape": (lambda: _with(tensors=_tensors_meta(
        **{"big.weight": {"shape": [10**400], "encoding": "topk-int8"}})),
        "big.weight.shape: Value error, more than 1099511627776 entries"),
    "metadata too many dims": (lambda: _with(tensors=_tensors_meta(
        scalar={"shape": [1] * 9, "encoding": "fp16"})), "scalar.shape: List should have"),
    "q longer than popcount": (lambda: _with({"big.weight.q": torch.zeros(513, dtype=torch.int8)}),
                               "q has shape \\(513,\\), the mask keeps 512"),
    "mask bit flipped": (_flip_a_mask_bit, "the mask keeps 51[13]"),
    "mask padding bits": (_padding_bits, "bits set past entry"),
    "scale shape": (lambda: _with({"big.weight.scale": torch.ones(2)}),
                    "scale has shape \\(2,\\)"),
    "NaN in fp16": (lambda: _with({"big.bias": torch.full((64,), float("nan"),
                                                          dtype=torch.float16)}),
                    "'big.bias' contains NaN"),
    "inf in fp16": (lambda: _with({"scalar": torch.tensor(float("inf"), dtype=torch.float16)}),
                    "'scalar' contains NaN or Inf"),
    "inf scale": (lambda: _with({"big.weight.scale": torch.tensor([float("inf")])}),
                  "'big.weight': scale inf"),
    "NaN scale": (lambda: _with({"edge.weight.scale": torch.tensor([float("nan")])}),
                  "'edge.weight': scale nan"),
    "negative scale": (lambda: _with({"big.weight.scale": torch.tensor([-0.5])}),
                       "'big.weight': scale -0.5"),
    "overflowing scale": (lambda: _with({"big.weight.scale": torch.tensor([3e38])}),
                          "'big.weight' contains NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_payloads_are_refused_with_a_reason(case: str) -> None:
    make, match = HOSTILE[case]
    with pytest.raises(UpdateFormatError, match=match):
        decode_update(make())


def test_size_is_checked_before_parsing() -> None:
    with pytest.raises(UpdateTooLargeError, match="101 bytes, at most 100"):
        decode_update(b"\xff" * 101, max_bytes=100)
    with pytest.raises(UpdateFormatError):
        decode_update(b"\xff" * 100, max_bytes=100)


def test_duplicate_header_keys_are_refused() -> None:
    payload = encode_update(_delta(), META).payload
    (size,) = struct.unpack("<Q", payload[:8])
    header = payload[8:8 + size].decode()
    # Repeat the first tensor entry under the same key: parsers disagree on which one wins.
    first = header.index('"big.bias"')
    end = header.index("}", first) + 1
    doubled = header[:end] + "," + header[first:end] + header[end:]
    forged = struct.pack("<Q", len(doubled)) + doubled.encode() + payload[8 + size:]
    with pytest.raises(UpdateFormatError, match="duplicate keys"):
        decode_update(forged)


def test_check_matches_names_what_differs() -> None:
    delta = _delta()
    check_matches(delta, {k: torch.zeros(v.shape) for k, v in delta.items()})
    with pytest.raises(UpdateFormatError, match="missing \\['extra'\\], unexpected \\['scalar'"):
        check_matches(delta, {**{k: v for k, v in delta.items() if k != "scalar"},
                              "extra": torch.zeros(1)})
    with pytest.raises(UpdateFormatError,
                       match=r"update: tensor 'big.bias' has shape \(64,\), the model has \(32,\)"):
        check_matches(delta, {**delta, "big.bias": torch.zeros(32)})


# Property: whatever the bytes, a clean answer ------------------------------------------------

VALID = encode_update(_delta(), META, density=0.1).payload
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.one_of(st.integers(0, HEADER_END - 1),
                                          st.integers(0, len(VALID) - 1)),
                                st.one_of(st.integers(0, 255),
                                          st.sampled_from(b'{}[]",:-.0123456789eE '))),
                      min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(VALID))))
def test_mutated_payloads_decode_cleanly_or_are_refused(edits: list[tuple[int, int]],
                                                        cut: int | None) -> None:
    data = bytearray(VALID)
    for position, value in edits:
        data[position] = value
    payload = bytes(data[:cut] if cut is not None else data)
    try:
        decoded = decode_update(payload)
    except UpdateFormatError:
        return
    assert set(decoded.tensors) == set(decoded.metadata.tensors)
    for name, tensor in decoded.tensors.items():
        assert tensor.dtype == torch.float32
        assert list(tensor.shape) == decoded.metadata.tensors[name].shape
        assert bool(torch.isfinite(tensor).all())
