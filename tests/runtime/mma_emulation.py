"""A numpy emulation of kernels/*.cu at the level of warp lanes and MMA fragments.

``mma_m16n8`` assembles A and B from the 32 lanes' registers by the PTX ISA's ownership rules and
hands each lane its C elements back by the same rules; ``quantize_lora_down`` and ``w4a4_gemm`` follow the
kernels' indexing line for line (block, warp, lane, group, half, tile). Wrong packing or indexing shows up
as a wrong product here, on the CPU.
"""

from __future__ import annotations

import numpy as np

LANES = np.arange(32)
GID, TID = LANES // 4, LANES % 4


def bytes_of(words: np.ndarray, signed: bool) -> np.ndarray:
    """uint32 [...] → its four bytes [..., 4] (byte 0 = least significant), as int."""
    b = np.stack([(words >> (8 * i)) & 0xFF for i in range(4)], axis=-1).astype(np.int64)
    return np.where(b >= 128, b - 256, b) if signed else b


def widen4(nibbles: np.ndarray, signed: bool) -> np.ndarray:
    """The kernel's widen4: nibble j of a 16-bit value → byte j of a uint32, sign- or zero-extended."""
    nibbles = nibbles.astype(np.uint32)
    spread = (nibbles & 0xF) | ((nibbles & 0xF0) << 4) | ((nibbles & 0xF00) << 8) | ((nibbles & 0xF000) << 12)
    if not signed:
        return spread
    per_byte = bytes_of(spread ^ np.uint32(0x08080808), signed=False) - 8  # __vsub4: no borrow across bytes
    return (per_byte & 0xFF).astype(np.uint32) @ (1 << (8 * np.arange(4, dtype=np.uint32)))


def nibbles_of(words: np.ndarray, signed: bool) -> np.ndarray:
    """uint32 [...] → its eight nibbles [..., 8] (nibble 0 = least significant), as int."""
    n = np.stack([(words >> (4 * i)) & 0xF for i in range(8)], axis=-1).astype(np.int64)
    return np.where(n >= 8, n - 16, n) if signed else n


def mma_m16n8(a: np.ndarray, b: np.ndarray, a_signed: bool, k: int) -> np.ndarray:
    """mma.m16n8k32 (8-bit elements) or mma.m16n8k64 (4-bit): a [32 lanes, 4] and b [32, 2] uint32 →
    c [32, 4] int64 of D = A·B, with A and B assembled by the PTX ISA's fragment ownership:
    lane (gid, tid) holds A[gid][tid·e ..], A[gid+8][tid·e ..], A[gid][k/2 + tid·e ..], A[gid+8][k/2 + tid·e ..]
    and B[tid·e ..][gid], B[k/2 + tid·e ..][gid], e = k/8 elements per register; C as c0…c3."""
    per = k // 8
    split = bytes_of if k == 32 else nibbles_of
    A = np.zeros((16, k), dtype=np.int64)
    B = np.zeros((k, 8), dtype=np.int64)
    a_elements, b_elements = split(a, a_signed), split(b, True)
    for lane in LANES:
        g, t = GID[lane], TID[lane]
        for register, (row, offset) in enumerate(((g, 0), (g + 8, 0), (g, k // 2), (g + 8, k // 2))):
            A[row, offset + t * per : offset + t * per + per] = a_elements[lane, register]
        for register, offset in enumerate((0, k // 2)):
            B[offset + t * per : offset + t * per + per, g] = b_elements[lane, register]
    D = A @ B
    return np.stack([D[GID, TID * 2], D[GID, TID * 2 + 1], D[GID + 8, TID * 2], D[GID + 8, TID * 2 + 1]], axis=1)


def quantize_lora_down(x, smooth, lora_down, shift, unsigned):
    """kernels/quantize_lora_down.cu in float32 numpy (same operation order): packed, scales, down."""
    f32 = np.float32
    xs = ((x.astype(f32) + f32(shift)) / smooth.astype(f32)).astype(f32)
    m, k = xs.shape
    groups = xs.reshape(m, k // 64, 64)
    peak = np.maximum(groups.max(-1), 0) if unsigned else np.abs(groups).max(-1)
    scales = (peak / f32(15 if unsigned else 7)).astype(f32)
    safe = np.where(scales > 0, scales, f32(1))[..., None]
    codes = np.where(scales[..., None] > 0, np.rint(groups / safe), 0)
    codes = np.clip(codes, 0, 15) if unsigned else np.clip(codes, -8, 7)
    codes = codes.reshape(m, k).astype(np.int64)
    packed = ((codes[:, 0::2] & 0xF) | ((codes[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    down = xs.astype(np.float64) @ lora_down.astype(np.float64).T
    return packed, scales, down


def w4a4_gemm(act_packed, act_scales, w_frag, w_scales, down, lora_up, bias, M, N, Npad, K, unsigned_a, s4=False):
    """kernels/w4a4_gemm.cu: 32×64 block tiles, 4 warps of 16×32, n8 tiles, groups of 64; the S4 variant
    does one m16n8k64 per group, the int8 variant two m16n8k32 halves."""
    out = np.full((M, N), np.nan)
    steps = K // 32
    flat_frag = w_frag.reshape(-1)  # the kernel indexes the words as one flat array

    def activation_words(rows, k, count=2):
        """``count`` bytes of packed codes from k on, little-endian (the kernel's 16- or 32-bit load)."""
        words = np.zeros(32, dtype=np.uint32)
        valid = rows < M
        for i in range(count):
            words[valid] |= act_packed[rows[valid], k[valid] // 2 + i].astype(np.uint32) << np.uint32(8 * i)
        return words

    for block_y in range(-(-M // 32)):
        for block_x in range(Npad // 64):
            for warp in range(4):
                row0 = block_y * 32 + (warp % 2) * 16
                col0 = block_x * 64 + (warp // 2) * 32
                acc = np.zeros((4, 32, 4))
                for g in range(K // 64):
                    dot = np.zeros((4, 32, 4), dtype=np.int64)
                    if s4:
                        k0 = g * 64
                        a = np.stack([activation_words(row0 + GID, k0 + TID * 8, 4),
                                      activation_words(row0 + GID + 8, k0 + TID * 8, 4),
                                      activation_words(row0 + GID, k0 + 32 + TID * 8, 4),
                                      activation_words(row0 + GID + 8, k0 + 32 + TID * 8, 4)], axis=1)
                        for t in range(4):
                            index = ((col0 // 8 + t) * (K // 64) + g) * 32 + LANES
                            b = flat_frag.reshape(-1, 2)[index]  # the kernel's uint2 load
                            dot[t] += mma_m16n8(a, b, not unsigned_a, 64)
                    for half in range(0 if s4 else 2):
                        k0 = g * 64 + half * 32
                        a = np.stack([
                            widen4(activation_words(row0 + GID, k0 + TID * 4), not unsigned_a),
                            widen4(activation_words(row0 + GID + 8, k0 + TID * 4), not unsigned_a),
                            widen4(activation_words(row0 + GID, k0 + 16 + TID * 4), not unsigned_a),
                            widen4(activation_words(row0 + GID + 8, k0 + 16 + TID * 4), not unsigned_a),
                        ], axis=1)
                        for t in range(4):
                            word = flat_frag[((col0 // 8 + t) * steps + k0 // 32) * 32 + LANES]
                            b = np.stack([widen4(word & 0xFFFF, True), widen4(word >> 16, True)], axis=1)
                            dot[t] += mma_m16n8(a, b, not unsigned_a, 32)
                    rows = np.stack([row0 + GID, row0 + GID + 8])
                    a_scale = np.where(rows < M, act_scales[np.minimum(rows, M - 1), g], 0.0)
                    for t in range(4):
                        cols = col0 + t * 8 + TID * 2
                        w0, w1 = w_scales[g, cols], w_scales[g, cols + 1]
                        acc[t] += dot[t] * np.stack([a_scale[0] * w0, a_scale[0] * w1, a_scale[1] * w0,
                                                     a_scale[1] * w1], axis=1)
                for t in range(4):
                    for i in range(4):
                        rows = row0 + GID + (8 if i >= 2 else 0)
                        cols = col0 + t * 8 + TID * 2 + (i & 1)
                        keep = (rows < M) & (cols < N)
                        y = acc[t][keep, i] + (down[rows[keep]] * lora_up[cols[keep]]).sum(-1)
                        if bias is not None:
                            y = y + bias[cols[keep]]
                        out[rows[keep], cols[keep]] = y
    return out
