"""NF4 against a float64 brute-force reference on fresh random weights: each code is the nearest of the 16
levels, dequantization is level × block absmax, and NF4Linear computes x·Ŵᵀ + b with that weight."""

from __future__ import annotations

import pytest
import torch

from svdq_cli.quant import nf4
from svdq_cli.quant.packing import unpack_nibbles
from svdq_cli.runtime.nf4_linear import NF4Linear


def weights(gen: torch.Generator, n: int = 24, k: int = 192) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen)
    w[torch.randint(0, n, (4,), generator=gen), torch.randint(0, k, (4,), generator=gen)] *= 20  # outliers
    w[3, 64:128] = 0  # a block of zeros
    return w


def test_codes_are_the_nearest_level_and_dequantize_to_level_times_absmax(gen):
    w = weights(gen)
    packed, absmax = nf4.quantize(w)
    blocks = w.double().reshape(w.shape[0], -1, nf4.BLOCK)
    expected_absmax = blocks.abs().amax(-1)
    assert torch.equal(absmax.double(), expected_absmax.float().double())
    codes = unpack_nibbles(packed, signed=False).long().reshape(blocks.shape)
    levels = torch.tensor(nf4.LEVELS, dtype=torch.float64)
    normalized = blocks / torch.where(expected_absmax > 0, expected_absmax, 1).unsqueeze(-1)
    distance = (normalized.unsqueeze(-1) - levels).abs()  # [N, blocks, 64, 16]
    chosen = distance.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen <= distance.min(-1).values + 1e-6)  # float32 normalization: ties within 1e-6
    assert torch.all(codes[3, 1] == 7)  # the zero block: level 0
    dequantized = nf4.dequantize(packed, absmax).double()
    assert torch.allclose(dequantized, (levels[codes] * expected_absmax.unsqueeze(-1)).reshape(w.shape), atol=1e-5)
    half_gap = float((levels[1:] - levels[:-1]).max() / 2)
    assert torch.all((dequantized - w.double()).abs().reshape(blocks.shape)
                     <= half_gap * expected_absmax.unsqueeze(-1) + 1e-5)


def test_nf4_linear_computes_with_the_dequantized_weight(gen):
    linear = torch.nn.Linear(128, 24)
    with torch.no_grad():
        linear.weight.copy_(weights(gen, 24, 128))
    layer = NF4Linear.from_linear(linear)
    x = torch.randn(5, 128, generator=gen)
    weight = nf4.dequantize(*nf4.quantize(linear.weight)).double()
    expected = x.double() @ weight.T + linear.bias.double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-4)
    assert (layer.in_features, layer.out_features) == (128, 24)


def test_a_width_the_block_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="NF4 blocks of 64 do not divide K = 96"):
        nf4.quantize(torch.zeros(4, 96))
