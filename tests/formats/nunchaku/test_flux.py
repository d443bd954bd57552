"""Layer conversion for Nunchaku: packed layers read back (independent readers) compute what ours compute.

Nunchaku's W4A4 layer computes ``Q((x + s)/λ)·Rᵀ + (x·lora_down)·lora_upᵀ + bias`` with ``s`` added by its
fused GELU epilogue; without activation quantization that is the dense map ``x·(R/λ + up·down)ᵀ + bias +
s·(R/λ)·1``, compared here in float64 with our layer's effective weight and original bias.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svdq_cli.formats.nunchaku import flux
from svdq_cli.methods.config import QuantConfig
from svdq_cli.quant.formats import dequantize, get_format
from svdq_cli.runtime.linear import SVDQLinear
from tests.formats.nunchaku import reference

DTYPE = torch.bfloat16


def nunchaku_dense(packed: dict[str, torch.Tensor], precision: str, shift: float = 0.0):
    """Dense float64 weight (on the raw input) and bias of one packed Nunchaku W4A4 layer."""
    fmt = get_format(precision)
    codes = reference.read_w4a4_codes(packed["qweight"], signed=not fmt.is_float)
    if fmt.is_float:
        scales = reference.read_micro_scales(packed["wscales"])
        residual = dequantize(codes, scales, fmt, packed["wtscale"].reshape(()))
        if "wcscales" in packed:
            residual = residual * reference.read_vector(packed["wcscales"]).float()[:, None]
    else:
        residual = dequantize(codes, reference.read_group_scales(packed["wscales"]), fmt)
    smoothed = residual.double() / reference.read_vector(packed["smooth"]).double()
    weight = smoothed.clone()
    if "lora_down" in packed:
        down, up = reference.read_lora_down(packed["lora_down"]), reference.read_lora_up(packed["lora_up"])
        weight += up.double() @ down.double()
    bias = reference.read_vector(packed["bias"]).double() + shift * smoothed.sum(dim=1)
    return weight, bias


def make_layer(gen, n, k, precision="int4", act="signed", shift=0.0, smooth=None, rank=16):
    linear = nn.Linear(k, n).to(DTYPE)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        linear.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    if smooth is None:
        smooth = torch.exp(torch.randn(k, generator=gen) * 0.5).to(DTYPE)
    config = QuantConfig(precision=precision, rank=rank)
    return linear, SVDQLinear.from_linear(linear, config, smooth=smooth, act=act, shift=shift)


def ours_dense(layer: SVDQLinear, linear: nn.Linear):
    return layer.effective_weight().double(), linear.bias.double()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


@pytest.mark.parametrize(("precision", "act", "shift"), [("int4", "signed", 0.0), ("int4", "unsigned", 0.3),
                                                         ("nvfp4", "signed", 0.0)])
def test_layer_computes_what_ours_computes(gen, precision, act, shift):
    n, k = 200, 192  # both pad (to 256)
    linear, layer = make_layer(gen, n, k, precision, act, shift)
    part = flux.Linear4.from_layer(layer)
    engine_shift = flux.GELU_SHIFT if precision == "int4" else 0.0
    packed = part.with_input_shift(engine_shift).pack(rank=32, dtype=DTYPE)
    assert packed["qweight"].shape == (256, 128) and packed["lora_down"].shape == (256, 32)
    weight, bias = nunchaku_dense(packed, precision, engine_shift)
    want_weight, want_bias = ours_dense(layer, linear)
    assert not weight[n:].any() and not weight[:, k:].any()
    # lora_down/λ and the bias are stored in bf16: agreement to bf16 precision (2^-8), not better
    assert relative(weight[:n, :k], want_weight) < 4e-3
    # the bias is rounded twice: ours (with our shift folded in) and Nunchaku's, each by half a bf16 step
    stored = reference.read_vector(packed["bias"]).double()[:n]
    bound = 2**-8 * (layer.bias.double().abs() + stored.abs()) + 1e-6
    assert ((bias[:n] - want_bias).abs() <= bound).all()


def test_the_engine_shift_is_cancelled_in_the_bias(gen):
    _, layer = make_layer(gen, 128, 128, act="unsigned", shift=0.2)
    part = flux.Linear4.from_layer(layer)
    shifted = part.with_input_shift(flux.GELU_SHIFT)
    want = flux.GELU_SHIFT * (part.residual().double() / part.smooth.double()).sum(dim=1)
    assert torch.allclose((part.bias - shifted.bias).double(), want, rtol=1e-5, atol=1e-6)


def test_qkv_fuses_and_proj_out_splits_exactly(gen):
    smooth = torch.exp(torch.randn(256, generator=gen) * 0.5).to(DTYPE)
    pairs = [make_layer(gen, 128, 256, smooth=smooth) for _ in range(3)]
    fused = flux.Linear4.fuse_n([flux.Linear4.from_layer(layer) for _, layer in pairs], DTYPE)
    assert fused.rank == 48
    weight, bias = nunchaku_dense(fused.pack(rank=48, dtype=DTYPE), "int4")
    want = [ours_dense(layer, linear) for linear, layer in pairs]
    assert relative(weight, torch.cat([w for w, _ in want])) < 4e-3
    assert relative(bias, torch.cat([b for _, b in want])) < 4e-3

    linear, layer = make_layer(gen, 128, 384)
    first, second = flux.Linear4.from_layer(layer).split_k(128)
    w1, b1 = nunchaku_dense(first.pack(16, DTYPE), "int4")
    w2, b2 = nunchaku_dense(second.pack(16, DTYPE), "int4")
    want_weight, want_bias = ours_dense(layer, linear)
    assert relative(torch.cat([w1, w2], dim=1), want_weight) < 4e-3
    assert relative(b1 + b2, want_bias) < 4e-3


def test_fusing_layers_with_different_smoothing_is_refused(gen):
    parts = [flux.Linear4.from_layer(make_layer(gen, 128, 128)[1]) for _ in range(2)]
    with pytest.raises(ValueError, match="different smoothing"):
        flux.Linear4.fuse_n(parts, DTYPE)


def test_nvfp4_fusion_carries_each_layer_tensor_scale_per_channel(gen):
    smooth = torch.ones(128, dtype=DTYPE)
    pairs = [make_layer(gen, 128, 128, "nvfp4", smooth=smooth) for _ in range(2)]
    with torch.no_grad():  # make the two tensor scales differ clearly
        pairs[1][1].wtscale.mul_(3.0)
    parts = [flux.Linear4.from_layer(layer) for _, layer in pairs]
    packed = flux.Linear4.fuse_n(parts, DTYPE).pack(rank=32, dtype=DTYPE)
    assert "wcscales" in packed
    weight, _ = nunchaku_dense(packed, "nvfp4")
    want = torch.cat([layer.effective_weight().double() for _, layer in pairs])
    assert relative(weight, want) < 4e-3


def test_adanorm_w4a16_reads_back_interleaved_with_the_scale_offset(gen):
    chunks, dim, k = 6, 64, 128
    weight = torch.randn(chunks * dim, k, generator=gen) * 0.05
    bias = (torch.randn(chunks * dim, generator=gen) * 0.1).to(DTYPE).float()
    packed, error = flux.adanorm_w4a16(weight, bias, chunks, DTYPE)
    codes = reference.read_awq_codes(packed["qweight"]).double()
    scales, zeros = packed["wscales"].T.double(), packed["wzeros"].T.double()  # [N, K/64]
    rebuilt = (codes.reshape(chunks * dim, -1, 64) * scales[..., None] + zeros[..., None]).reshape(chunks * dim, k)
    # row i·chunks + c is chunk c's channel i
    deinterleaved = rebuilt.reshape(dim, chunks, k).transpose(0, 1).reshape(chunks * dim, k)
    measured = relative(deinterleaved, weight.double())
    assert measured == pytest.approx(error, rel=1e-3) and error < 0.12
    read_bias = packed["bias"].double().reshape(dim, chunks).T.clone()
    read_bias[[1, 4]] -= 1.0
    # the 1 + scale folded into a bf16 bias costs precision: half a bf16 step at 1…2 is 2^-8
    assert (read_bias.reshape(-1) - bias.double()).abs().max() <= 2**-8


def test_check_supported_names_what_nunchaku_cannot_run():
    recipe = {"family": "tiny-flux", "dtype": "bfloat16",
              "quant": {"precision": "int4", "weight_only": False, "scale_dtype": "model"}}
    flux.check_supported(recipe)
    cases = [({"family": "tiny-sd3"}, "covers Flux"), ({"dtype": "float32"}, "bfloat16 or float16"),
             ({"quant": {**recipe["quant"], "precision": "int8"}}, "int4 or nvfp4"),
             ({"quant": {**recipe["quant"], "weight_only": True}}, "weight-only"),
             ({"quant": {**recipe["quant"], "scale_dtype": "float32"}}, "scales in the model dtype")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            flux.check_supported({**recipe, **change})
