"""The load-time fragment packing of weights, read back lane by lane from the PTX ISA fragment maps.

(The kernels themselves run on the CPU emulator: test_emulated_kernels.py.)
"""

import numpy as np
import torch

from svdq_cli.runtime.fragments import pack_weight_fragments, padded_columns


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
