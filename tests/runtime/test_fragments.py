"""The load-time fragment packing of weights, read back lane by lane from the PTX ISA fragment maps.

(The kernels themselves run on the CPU emulator: test_emulated_kernels.py.)
"""

import numpy as np
import torch

from svdq_cli.runtime.fragments import pack_weight_fragments, pack_weight_scales, padded_columns


def test_weight_fragment_words_hold_each_lanes_b_operands(gen):
    codes = torch.randint(-8, 8, (136, 128), generator=gen, dtype=torch.int8).numpy()
    words = pack_weight_fragments(codes)
    assert words.shape == (2, padded_columns(136) // 8, 32, 2) and words.dtype == np.uint32
    for group in range(2):
        for n_tile in range(padded_columns(136) // 8):
            for lane in range(32):
                gid, tid = divmod(lane, 4)
                n = n_tile * 8 + gid
                for half in range(2):  # b0: codes g·64 + tid·8 .. +7; b1: g·64 + 32 + tid·8 .. +7
                    word = int(words[group, n_tile, lane, half])
                    nibbles = [(word >> (4 * j)) & 0xF for j in range(8)]
                    k0 = group * 64 + half * 32 + tid * 8
                    expected = list(codes[n, k0 : k0 + 8]) if n < 136 else [0] * 8  # padding: zero codes
                    assert [v - 16 if v >= 8 else v for v in nibbles] == expected


def test_weight_scales_are_group_major_and_zero_padded(gen):
    scales = torch.rand(136, 3, generator=gen).to(torch.bfloat16)
    packed = pack_weight_scales(scales)
    assert packed.shape == (3, 256) and packed.dtype == np.float32
    np.testing.assert_array_equal(packed[:, :136], scales.float().numpy().T)
    assert not packed[:, 136:].any()
