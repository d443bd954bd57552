"""Checks of the fused kernels against the reference, shared by the emulated-kernel and planted-bug tests."""

import torch
from torch import nn

from svdq_cli import QuantConfig, SVDQLinear
from svdq_cli.quant.formats import FORMATS, quantize
from svdq_cli.quant.packing import pack_nibbles
from svdq_cli.runtime import kernels
from svdq_cli.runtime.fragments import padded_rows


def make_layer(k, n, rank, dtype, act, gen):
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        linear.bias.copy_(torch.randn(n, generator=gen))
    smooth = torch.rand(k, generator=gen) + 0.5
    return SVDQLinear.from_linear(linear.to(dtype), QuantConfig(rank=rank, exact_svd_max_elements=0), smooth=smooth,
                                  act=act, shift=0.17 if act == "unsigned" else 0.0)


def make_input(m, k, act, dtype, gen):
    x = torch.randn(m, k, generator=gen) * (1 + 20 * (torch.rand(k, generator=gen) > 0.97))  # outlier channels
    return (nn.functional.gelu(x) if act == "unsigned" else x).to(dtype)


def poisoned(*shape, dtype, device="cpu"):
    return torch.full(shape, 0xAB if dtype == torch.uint8 else float("nan"), dtype=dtype, device=device)


def check_activations(layer, x, backend):
    """quantize_lora_down.cu's codes and scales are the reference quantizer's, bit for bit, its down-projection
    is x̂·lora_downᵀ to float32 accuracy, and the padding rows the GEMM reads are zero."""
    m, k = x.shape
    mpad = padded_rows(m)
    packed = poisoned(mpad, k // 2, dtype=torch.uint8, device=x.device)
    scales = poisoned(k // 64, mpad, dtype=torch.float32, device=x.device)
    down = poisoned(mpad, max(layer.rank, 1), dtype=torch.float32, device=x.device)
    kernels.launch_quantize(layer, x, backend, packed, scales, down)
    smoothed = (x.float() + (layer.shift if layer.shift is not None else 0.0)) / layer.smooth.float()
    expected = quantize(smoothed, FORMATS["int4"], signed=layer.act == "signed", per_row_tensor_scale=True,
                        full_range=layer.act_range == "full")
    assert torch.equal(packed[:m], pack_nibbles(expected.codes)), "activation codes differ from the reference"
    assert torch.equal(scales[:, :m].T, expected.scales), "activation scales differ from the reference"
    assert not packed[m:].any() and not scales[:, m:].any(), "padding rows are not zero"
    if layer.rank:
        reference = smoothed.double() @ layer.lora_down.double().T
        assert (down[:m].double() - reference).abs().max() <= 1e-5 * reference.abs().max() + 1e-6
        assert not down[m:].any(), "padding rows of the branch are not zero"


def check_gemm(layer, x, backend):
    """The fused forward's every element within two roundings (in the output dtype) of reference_forward."""
    out = poisoned(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    fused = kernels.fused_forward(layer, x, out=out, backend=backend)
    assert fused.data_ptr() == out.data_ptr()
    assert torch.isfinite(fused).all(), "outputs left unwritten (poison) or not finite"
    reference = layer.reference_forward(x).float()
    unit = 2.0 ** (-8 if x.dtype == torch.bfloat16 else -11)  # unit roundoff of the output dtype
    bound = 2 * unit * reference.abs() + 1e-5 * reference.pow(2).mean().sqrt()
    worst = ((fused.float() - reference).abs() / bound).max().item()
    assert worst <= 1.0, f"an element is {worst:.2f}× the two-rounding bound away from the reference"
    return fused
