"""The fused kernels' data layout and indexing, checked on the CPU through a lane-level numpy emulation."""

import numpy as np
import pytest
import torch
from torch import nn

from svdq_cli import QuantConfig, SVDQLinear
from svdq_cli.quant.formats import FORMATS, quantize
from svdq_cli.quant.packing import pack_nibbles, unpack_nibbles
from svdq_cli.runtime.fragments import pack_weight_fragments, pack_weight_scales, padded_columns
from tests.runtime import mma_emulation as emu


def test_weight_fragment_words_hold_each_lanes_b_operand(gen):
    codes = torch.randint(-8, 8, (24, 96), generator=gen, dtype=torch.int8).numpy()
    words = pack_weight_fragments(codes)
    assert words.shape == (padded_columns(24) // 8, 96 // 32, 32) and words.dtype == np.uint32
    for n_tile in range(3):
        for step in range(3):
            for lane in range(32):
                gid, tid = divmod(lane, 4)
                n, word = n_tile * 8 + gid, int(words[n_tile, step, lane])
                nibbles = [(word >> (4 * j)) & 0xF for j in range(8)]
                signed = [v - 16 if v >= 8 else v for v in nibbles]
                k0 = step * 32
                assert signed[:4] == list(codes[n, k0 + tid * 4 : k0 + tid * 4 + 4])
                assert signed[4:] == list(codes[n, k0 + 16 + tid * 4 : k0 + 16 + tid * 4 + 4])
    assert not words[padded_columns(24) // 8 - 1].any() or padded_columns(24) == 24  # padding is zero codes


def test_s4_fragment_words_hold_each_lanes_b_operand(gen):
    codes = torch.randint(-8, 8, (16, 128), generator=gen, dtype=torch.int8).numpy()
    words = pack_weight_fragments(codes, s4=True)
    assert words.shape == (padded_columns(16) // 8, 2, 32, 2)
    for n_tile in range(2):
        for group in range(2):
            for lane in range(32):
                gid, tid = divmod(lane, 4)
                n = n_tile * 8 + gid
                for half in range(2):
                    word = int(words[n_tile, group, lane, half])
                    nibbles = [(word >> (4 * j)) & 0xF for j in range(8)]
                    k0 = group * 64 + half * 32 + tid * 8
                    assert [v - 16 if v >= 8 else v for v in nibbles] == list(codes[n, k0 : k0 + 8])


@pytest.mark.parametrize("s4", [False, True], ids=["int8-mma", "s4-mma"])
@pytest.mark.parametrize("act,rank,shape", [("signed", 32, (37, 128, 72)), ("unsigned", 16, (5, 192, 64)),
                                            ("signed", 0, (33, 64, 136))])
def test_emulated_kernels_reproduce_the_reference_forward(gen, act, rank, shape, s4):
    m, k, n = shape
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        linear.bias.copy_(torch.randn(n, generator=gen))
    smooth = torch.rand(k, generator=gen) + 0.5
    shift = 0.17 if act == "unsigned" else 0.0
    layer = SVDQLinear.from_linear(linear, QuantConfig(rank=rank), smooth=smooth, act=act, shift=shift)
    x = torch.randn(m, k, generator=gen) * (1 + 10 * (torch.rand(k, generator=gen) > 0.95))
    if act == "unsigned":
        x = nn.functional.gelu(x)

    packed, a_scales, down = emu.quantize_lora_down(
        x.numpy(), layer.smooth.numpy(), layer.lora_down.numpy(), shift, unsigned=act == "unsigned")
    # Activation codes are those of the reference's quantizer, exactly.
    smoothed = (x + layer.shift if layer.shift is not None else x) / layer.smooth
    reference_q = quantize(smoothed, FORMATS["int4"], signed=act == "signed", per_row_tensor_scale=True)
    np.testing.assert_array_equal(packed, pack_nibbles(reference_q.codes).numpy())
    np.testing.assert_array_equal(a_scales, reference_q.scales.numpy())

    codes = unpack_nibbles(layer.qweight, signed=True)
    out = emu.w4a4_gemm(packed, a_scales.astype(np.float64), pack_weight_fragments(codes, s4=s4),
                        pack_weight_scales(layer.wscales), down, layer.lora_up.double().numpy(),
                        layer.bias.double().numpy(), m, n, padded_columns(n), k, unsigned_a=act == "unsigned", s4=s4)
    assert not np.isnan(out).any(), "some outputs were never written"
    expected = layer(x).double().numpy()
    error = np.linalg.norm(out - expected) / np.linalg.norm(expected)
    assert error < 1e-5, error
