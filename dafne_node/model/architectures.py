"""Built-in segmentation architectures, addressed by id.

A model directory never contains code: its manifest names one of the architectures
registered here and the parameters to build it with, and the weights are loaded into the
module this file builds. Adding an architecture therefore means adding code to the node
(reviewed, versioned), never running something that arrived over the network.

The default architecture, ``"unet2d-res"``, is a 2D residual U-Net that segments one axial
slice at a time. It uses GroupNorm rather than BatchNorm because the same weights are
fine-tuned on a handful of corrected slices (batch statistics of two or three slices are
noise) and averaged across hospitals (running statistics are site-specific and would not
average meaningfully); GroupNorm has neither problem and, in bf16 on a channels-last tensor,
runs as fast as BatchNorm on the CPUs this node targets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

LOGGER = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "ArchitectureInfo",
    "ResidualUNet2D",
    "build_model",
    "count_parameters",
    "default_params",
]


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with as many groups as requested that still divide ``channels``."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with normalisation and an identity (or 1x1) shortcut.

    The shortcut lets a 1-4 M parameter network train in a few thousand steps on a CPU;
    ``stride=2`` makes the block also the downsampling step of the encoder, which is cheaper
    than a separate pooling layer followed by a full-resolution convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1,
                 groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(out_channels, groups)
        self.shortcut: nn.Module
        if in_channels == out_channels and stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                _group_norm(out_channels, groups),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = functional.relu(self.norm1(self.conv1(x)), inplace=True)
        y = self.norm2(self.conv2(y))
        return functional.relu(y + self.shortcut(x), inplace=True)


class ResidualUNet2D(nn.Module):
    """2D U-Net whose encoder and decoder stages are residual blocks.

    Parameters
    ----------
    in_channels:
        Image channels per slice (1 for a single MR contrast).
    num_classes:
        Output channels: background plus one per label.
    base_channels:
        Width of the full-resolution stage; each of the ``depth`` downsamplings doubles it,
        up to ``max_channels``.
    depth:
        Number of downsamplings; the input height and width must be multiples of
        ``2**depth``.
    max_channels:
        Cap on the width of the deepest stages (keeps the weight file small).
    groups:
        GroupNorm groups per normalisation layer.
    """

    architecture_id = "unet2d-res"

    def __init__(self, *, in_channels: int, num_classes: int, base_channels: int, depth: int,
                 max_channels: int, groups: int) -> None:
        super().__init__()
        widths = [min(base_channels * 2**i, max_channels) for i in range(depth + 1)]
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            _group_norm(widths[0], groups),
            nn.ReLU(inplace=True),
        )
        self.encoder = nn.ModuleList(
            [ResidualBlock(widths[0], widths[0], groups=groups)]
            + [ResidualBlock(widths[i - 1], widths[i], stride=2, groups=groups)
               for i in range(1, depth + 1)]
        )
        self.decoder = nn.ModuleList(
            [ResidualBlock(widths[i] + widths[i + 1], widths[i], groups=groups)
             for i in range(depth)]
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, in_channels, H, W)`` to logits ``(N, num_classes, H, W)``."""
        multiple = 2**self.depth
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"input height and width must be multiples of {multiple}, got "
                f"{tuple(x.shape[-2:])}"
            )
        x = self.stem(x)
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for level in reversed(range(self.depth)):
            x = functional.interpolate(x, scale_factor=2.0, mode="nearest")
            x = self.decoder[level](torch.cat([x, skips[level]], dim=1))
        return self.head(x)


@dataclass(frozen=True)
class ArchitectureInfo:
    """A registered architecture: how to build it and which parameters it accepts."""

    id: str
    factory: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    description: str


ARCHITECTURES: dict[str, ArchitectureInfo] = {
    "unet2d-res": ArchitectureInfo(
        id="unet2d-res",
        factory=ResidualUNet2D,
        defaults={
            "in_channels": 1,
            "num_classes": 7,
            "base_channels": 16,
            "depth": 4,
            "max_channels": 256,
            "groups": 8,
        },
        description="2D residual U-Net with GroupNorm, one axial slice at a time",
    ),
}
"""Architectures a manifest may name. Every parameter is an int."""


def default_params(architecture: str) -> dict[str, Any]:
    """Return a copy of the default parameters of ``architecture``.

    Raises
    ------
    ValueError
        If the architecture is not registered.
    """
    return dict(_info(architecture).defaults)


def _info(architecture: str) -> ArchitectureInfo:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(
            f"unknown architecture {architecture!r}; known architectures: {known}"
        ) from None


def _validated_params(architecture: str, params: Mapping[str, Any]) -> dict[str, Any]:
    info = _info(architecture)
    unknown = sorted(set(params) - set(info.defaults))
    if unknown:
        raise ValueError(
            f"unknown parameter {unknown[0]!r} for architecture {architecture!r}; "
            f"accepted: {', '.join(info.defaults)}"
        )
    merged = {**info.defaults, **params}
    for key, value in merged.items():
        # bool is an int subclass; a manifest saying true for a width is a mistake.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"parameter {key!r} of architecture {architecture!r} must be a positive "
                f"integer, got {value!r}"
            )
    if merged["depth"] > 7:
        raise ValueError(f"parameter 'depth' must be at most 7, got {merged['depth']}")
    return merged


def build_model(architecture: str, params: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a registered architecture with validated parameters.

    Parameters missing from ``params`` take the architecture's defaults. The returned module
    carries ``architecture_id`` and ``architecture_params`` (the complete, validated
    parameters) so that it can be saved without restating them.

    Raises
    ------
    ValueError
        If the architecture is unknown, or a parameter is unknown or not a positive integer;
        the message names it.
    """
    merged = _validated_params(architecture, params or {})
    model = _info(architecture).factory(**merged)
    model.architecture_id = architecture
    model.architecture_params = merged
    LOGGER.debug("built %s with %s (%d parameters)", architecture, merged,
                 count_parameters(model))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
