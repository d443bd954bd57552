"""The 4-bit residual of SVDQuant, quantized a few rows at a time (never a float32 copy of a whole weight)."""

import pytest
import torch

from svdq_cli import QuantConfig
from svdq_cli.quant import svdquant
from svdq_cli.quant.formats import searched_scales


def parts(gen, n=48, k=256, rank=16):
    weight = (torch.randn(n, k, generator=gen) * (1 + 4 * (torch.rand(n, k, generator=gen) > 0.97))).bfloat16()
    smooth = (torch.rand(k, generator=gen) + 0.5).bfloat16().float()
    down = (torch.randn(rank, k, generator=gen) * 0.1).bfloat16()
    up = (torch.randn(n, rank, generator=gen) * 0.1).bfloat16()
    rows = torch.randn(200, k, generator=gen).abs() + torch.rand(k, generator=gen)
    grouped = rows.reshape(200, -1, 64).transpose(0, 1)
    return weight, smooth, down, up, torch.bmm(grouped.transpose(1, 2), grouped) / 200


def float64_residual(weight, smooth, down, up):
    return weight.double() * smooth.double() - up.double() @ down.double()


@pytest.mark.parametrize("scale_search", [True, False])
def test_chunking_does_not_change_the_residual_codes(gen, monkeypatch, scale_search):
    weight, smooth, down, up, gram = parts(gen)
    config = QuantConfig(rank=16, scale_search=scale_search)
    whole = svdquant.quantize_residual(weight, smooth, down, up, config, torch.bfloat16, gram=gram)
    monkeypatch.setattr(svdquant, "RESIDUAL_CHUNK_ELEMENTS", 3 * 256)  # three rows at a time, 16 chunks
    chunked = svdquant.quantize_residual(weight, smooth, down, up, config, torch.bfloat16, gram=gram)
    assert torch.equal(whole.codes, chunked.codes) and torch.equal(whole.scales, chunked.scales)
    residual = float64_residual(weight, smooth, down, up)
    step = whole.scales.double().repeat_interleave(64, dim=1)
    error = (whole.dequantize().double() - residual).abs()
    if scale_search:  # the search's choice per group, on the residual as float32 computes it
        expected = searched_scales(residual.float(), config.format, gram, torch.bfloat16)
        assert (whole.scales == expected).float().mean() > 0.97  # float32 vs float64 residual: rare near-ties
    else:  # round to nearest with full-range scales: within half a step of the exact residual (float32 slack)
        assert (error <= step / 2 + 1e-5 * residual.abs().max()).all()
