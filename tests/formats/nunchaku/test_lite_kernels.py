"""The CPU stand-in of the Nunchaku Lite kernels, called through diffusers' own SVDQW4A4Linear and
AWQW4A16Linear modules, against float64 computations of the kernels' documented semantics."""

from __future__ import annotations

import pytest
import torch

from svdq_cli.formats.nunchaku import layout
from svdq_cli.formats.nunchaku.lite_kernels import install
from svdq_cli.quant.formats import E2M1_VALUES

install()
from diffusers.quantizers.nunchaku.utils import AWQW4A16Linear, SVDQW4A4Linear  # noqa: E402 (needs the stand-in)

DTYPE = torch.bfloat16


def _e2m1_f64(ratio: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (ties to the even mantissa), saturating at 6, in float64."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    magnitude = ratio.abs().clamp(max=6.0)
    distance = (magnitude.unsqueeze(-1) - grid).abs()
    best = distance.min(dim=-1, keepdim=True).values
    ties = (distance == best).to(torch.int64)
    even = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # index parity: 0, 1, 2, 3, 4, 6 are even mantissas
    choice = torch.where(ties.sum(-1) > 1, (ties * (1 - even)).argmax(-1), ties.argmax(-1))
    return torch.sign(ratio) * grid[choice]


def _activations_f64(x: torch.Tensor, fp4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and stored group scales of ``x`` (16-bit, smoothed) under the kernels' rule, in float64."""
    group, qmax = (16, 6.0) if fp4 else (64, 7.0)
    grouped = x.double().reshape(x.shape[0], -1, group)
    scale = (grouped.abs().amax(-1, keepdim=True).float() * torch.tensor(1 / qmax)).double()
    if fp4:
        scale = scale.clamp(max=448.0)
        stored = scale.float().to(torch.float8_e4m3fn).double()
    else:
        stored = scale.float().to(DTYPE).double()
    # the kernel multiplies by the float32 reciprocal of the unrounded scale: near-ties round as in float32
    inverse = torch.where(scale > 0, 1 / scale.float(), torch.zeros_like(scale.float()))
    ratio = (grouped.float() * inverse).double()
    codes = _e2m1_f64(ratio) if fp4 else torch.round(ratio).clamp(-8, 7)
    return codes, stored


def _bf16(values: torch.Tensor) -> torch.Tensor:
    return values.to(DTYPE).double()


def _main_product_f64(codes, stored, weight_codes, weight_scales, fp4: bool) -> torch.Tensor:
    """Σ over groups of (a·sₐ)(w·s_w). NVFP4 in float64; INT4 with the kernel's 16-bit steps: each 64-group's
    integer sum and its scale product rounded to bf16, accumulated by fused multiply-adds rounded to bf16."""
    rows, groups, group = codes.shape
    a = codes.reshape(rows, -1)
    if fp4:
        activations = (codes * stored).reshape(rows, -1)
        weight = (weight_codes.reshape(weight_codes.shape[0], groups, group)
                  * weight_scales.double().unsqueeze(-1)).reshape(weight_codes.shape[0], -1)
        return activations @ weight.T
    acc = torch.zeros(rows, weight_codes.shape[0], dtype=torch.float64)
    for g in range(groups):
        part = slice(g * group, (g + 1) * group)
        partial = _bf16(a[:, part] @ weight_codes[:, part].double().T)
        scale = _bf16(stored[:, g] * weight_scales[:, g].double()[None, :])
        acc = _bf16(partial * scale + acc)
    return acc


def _w4a4_case(gen, fp4: bool, rows: int):
    n, k, rank = 256, 384, 32
    group = 16 if fp4 else 64
    if fp4:
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int8)
        scales = (torch.rand(n, k // group, generator=gen) * 200 + 1).to(torch.float8_e4m3fn)
        values = torch.tensor(E2M1_VALUES, dtype=torch.float64)[(codes & 7).long()] * torch.where(codes >= 8, -1, 1)
    else:
        codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
        scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).to(DTYPE)
        values = codes.double()
    weight = (values.reshape(n, -1, group) * scales.double().unsqueeze(-1)).reshape(n, k)
    smooth = (torch.rand(k, generator=gen) * 3 + 0.25).to(DTYPE)
    down = (torch.randn(rank, k, generator=gen) * 0.05).to(DTYPE)
    up = (torch.randn(n, rank, generator=gen) * 0.05).to(DTYPE)
    bias = torch.randn(n, generator=gen).to(DTYPE)
    channel = (torch.rand(n, generator=gen) + 0.5).to(DTYPE)
    tensor_scale = torch.tensor([0.01], dtype=DTYPE)
    x = (torch.randn(rows, k, generator=gen) * 2).to(DTYPE)
    x[:, 7] *= 40  # an outlier channel the smoothing divides away
    state = {"qweight": layout.pack_w4a4_codes(codes), "smooth_factor": layout.pack_vector(smooth),
             "wscales": layout.pack_micro_scales(scales) if fp4 else layout.pack_group_scales(scales),
             "proj_down": layout.pack_lora_down(down, k, rank), "proj_up": layout.pack_lora_up(up, n, rank),
             "bias": layout.pack_vector(bias)}
    if fp4:
        state.update(wcscales=layout.pack_vector(channel), wtscale=tensor_scale)
    smoothed = (x.float() / smooth.float()).to(DTYPE)  # the kernel divides in 16 bits
    a_codes, a_scales = _activations_f64(smoothed, fp4)
    exact = (a_codes * a_scales).reshape(rows, k) @ weight.T
    lora = _bf16(x.double() @ down.double().T) @ up.double().T
    scale = tensor_scale.double() * channel.double() if fp4 else 1.0
    # the epilogue's steps, each rounded to bf16: main (× wtscale for NVFP4), × wcscales + bias, + the branch
    main = _bf16(_main_product_f64(a_codes, a_scales, values, scales, fp4) * (tensor_scale.double() if fp4 else 1))
    staged = _bf16(_bf16(main * (channel.double() if fp4 else 1) + bias.double()) + lora)
    return state, x, staged, exact * scale + bias.double() + lora


@pytest.mark.parametrize("fp4", [False, True])
@pytest.mark.parametrize("rows", [5, 300])
def test_w4a4_linear_computes_the_kernels_float64_semantics(gen, fp4, rows):
    state, x, expected, exact = _w4a4_case(gen, fp4, rows)
    module = SVDQW4A4Linear(384, 256, rank=32, precision="nvfp4" if fp4 else "int4",
                            group_size=16 if fp4 else 64, torch_dtype=DTYPE)
    module.load_state_dict(state)
    got = module(x.reshape(1, rows, 384)).reshape(rows, 256).double()
    assert ((got - expected).norm() / expected.norm()) < 2e-3  # bf16 output, last-bit rounding differences
    assert ((got - exact).norm() / exact.norm()) < 4e-2  # what the 16-bit arithmetic costs


def test_a_row_major_weight_is_caught(gen):
    """The same tensors with qweight in plain nibble order (what a logical export would write) are far off."""
    state, x, expected, _ = _w4a4_case(gen, False, 40)
    codes = layout.unpack_w4a4_codes(state["qweight"], signed=True).to(torch.int16) & 0xF
    state["qweight"] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    module = SVDQW4A4Linear(384, 256, rank=32, torch_dtype=DTYPE)
    module.load_state_dict(state)
    got = module(x).double()
    assert (got - expected).norm() / expected.norm() > 0.3


@pytest.mark.parametrize("rows", [3, 9, 40])  # gemv in chunks of 8, and the GEMM from 16 rows
def test_w4a16_linear_computes_q_times_scale_plus_zero(gen, rows):
    n, k = 256, 192
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // 64, n, generator=gen) * 0.01 + 0.001).to(DTYPE)
    zeros = (torch.randn(k // 64, n, generator=gen) * 0.05).to(DTYPE)
    bias = torch.randn(n, generator=gen).to(DTYPE)
    module = AWQW4A16Linear(k, n, torch_dtype=DTYPE)
    module.load_state_dict({"qweight": layout.pack_awq_codes(codes), "wscales": scales, "wzeros": zeros,
                            "bias": bias})
    x = torch.randn(rows, k, generator=gen).to(DTYPE)
    weight = codes.double().reshape(n, -1, 64) * scales.T.double().unsqueeze(-1) + zeros.T.double().unsqueeze(-1)
    expected = x.double() @ weight.reshape(n, k).T + bias.double()
    got = module(x).double()
    assert ((got - expected).norm() / expected.norm()) < 1e-2


def test_the_stand_in_refuses_epilogues_it_does_not_implement():
    from svdq_cli.formats.nunchaku.lite_kernels import OPS

    with pytest.raises(NotImplementedError, match="fused GLU"):
        OPS.quantize_w4a4_act_fuse_lora(*[None] * 6, True, False)
