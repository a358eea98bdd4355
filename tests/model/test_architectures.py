from __future__ import annotations

import pytest
import torch

from dafne_node.model.architectures import ARCHITECTURES, build_model, count_parameters


def test_default_unet_shape_and_size() -> None:
    model = build_model("unet2d-res", {}).eval()
    n = count_parameters(model)
    assert 1_000_000 <= n <= 4_000_000
    assert n * 4 <= 20 * 2**20  # fp32 weights fit the 20 MB limit
    x = torch.zeros(2, 1, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (2, 7, 64, 96)


def test_build_records_architecture() -> None:
    model = build_model("unet2d-res", {"base_channels": 4, "depth": 2})
    assert model.architecture_id == "unet2d-res"
    assert model.architecture_params == {**ARCHITECTURES["unet2d-res"].defaults,
                                         "base_channels": 4, "depth": 2}


def test_unknown_architecture_named() -> None:
    with pytest.raises(ValueError, match="'vnet'"):
        build_model("vnet", {})


@pytest.mark.parametrize(("params", "needle"), [
    ({"width": 3}, "'width'"),
    ({"depth": 0}, "'depth'"),
    ({"base_channels": 2.5}, "'base_channels'"),
    ({"num_classes": True}, "'num_classes'"),
])
def test_bad_params_named(params: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        build_model("unet2d-res", params)


def test_input_not_multiple_refused() -> None:
    model = build_model("unet2d-res", {"base_channels": 4, "depth": 3})
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 1, 20, 24))
