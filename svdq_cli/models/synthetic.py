"""Synthetic layers with planted activation outliers, for benchmarks, tests and demos.

Random layers have none of the outliers that make 4-bit activations hard, so these plant them the way real
diffusion and text transformers show them: a few input channels 20–50× the rest.
"""

from __future__ import annotations

import torch
from torch import nn


def outlier_scale(in_features: int, generator: torch.Generator, outliers: int = 16) -> torch.Tensor:
    """Per-channel input scale: 1, except ``outliers`` random channels scaled 20–50×."""
    scale = torch.ones(in_features)
    channels = torch.randperm(in_features, generator=generator)[:outliers]
    scale[channels] = 20 + 30 * torch.rand(outliers, generator=generator)
    return scale


def planted_outlier_layer(
    in_features: int, out_features: int, seed: int, structured: bool = True, calibration_rows: int = 4096
) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A bf16 layer, ``calibration_rows`` calibration rows and 512 held-out rows.

    Trained transformer layers are not i.i.d. noise, and two of their properties matter here:
    - weights: a Gaussian bulk plus a few dominant directions (``structured``: a rank-16 part carrying 25%
      of the energy), as the singular-value plots of real DiT weights show;
    - activations: channels are correlated (``structured``: a shared 64-dimensional component carrying
      half the energy of the regular channels), and a few channels are 20–50× the rest.
    Held-out rows share the outlier channels and the correlation, as a layer's inputs do across prompts.
    ``structured=False`` gives i.i.d. Gaussian weights and inputs (with the same planted outliers).
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    if structured:
        left = torch.randn(out_features, 16, generator=generator)
        right = torch.randn(16, in_features, generator=generator)
        low_rank = left @ right
        weight = weight * 0.75**0.5 + low_rank * (0.25 * weight.square().sum() / low_rank.square().sum()) ** 0.5
    layer = nn.Linear(in_features, out_features, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.randn(out_features, generator=generator) * 0.1)
    scale = outlier_scale(in_features, generator)
    mixing = torch.randn(64, in_features, generator=generator) / 64**0.5

    def rows(count: int) -> torch.Tensor:
        x = torch.randn(count, in_features, generator=generator)
        if structured:
            x = (x + torch.randn(count, 64, generator=generator) @ mixing) / 2**0.5
        return (x * scale).to(torch.bfloat16)

    return layer, rows(calibration_rows), rows(512)
