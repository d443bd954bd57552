"""Load-time re-packing of an SVDQLinear's weights into the fused GEMM's fragment layout.

Files keep the canonical layout (DESIGN.md §2); kernels/w4a4_gemm.cu wants each lane's B fragment for one
MMA to be contiguous (B = Wᵀ, so B[k][n] = W[n][k]; lane = 4·gid + tid, n = n_tile·8 + gid).

int8 variant (mma.m16n8k32, sm_90): one uint32 per lane per k32 step, ``[Npad/8, K/32, 32]``; b0 owns
B[tid·4 .. +3][gid], b1 owns B[16 + tid·4 .. +3][gid]:

    word = Σ_j code[n, step·32 + tid·4 + j] << 4·j  +  Σ_j code[n, step·32 + 16 + tid·4 + j] << 16 + 4·j

S4 variant (mma.m16n8k64, sm_80–89): two uint32 per lane per group of 64, ``[Npad/8, K/64, 32, 2]``; b0
owns B[tid·8 .. +7][gid], b1 owns B[32 + tid·8 .. +7][gid]:

    b0 = Σ_j code[n, g·64 + tid·8 + j] << 4·j,   b1 = Σ_j code[n, g·64 + 32 + tid·8 + j] << 4·j

N is padded to a multiple of 64 (the kernel's block width) with zero codes and zero scales. Weight scales
become float32 ``[K/64, Npad]`` so a lane's two adjacent output columns are adjacent in memory.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK_N = 64


def padded_columns(out_features: int) -> int:
    return -(-out_features // BLOCK_N) * BLOCK_N


def pack_weight_fragments(codes: torch.Tensor | np.ndarray, s4: bool = False) -> np.ndarray:
    """Canonical signed codes ``[N, K]`` → uint32 words ``[Npad/8, K/32, 32]``, or with ``s4``
    ``[Npad/8, K/64, 32, 2]``."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    n, k = codes.shape
    step = 64 if s4 else 32
    if k % step:
        raise ValueError(f"in_features {k} is not a multiple of {step}")
    padded = np.zeros((padded_columns(n), k), dtype=np.uint32)
    padded[:n] = codes.astype(np.int64) & 0xF
    # [n_tile, gid, step, half, tid, j]: k = step_index·step + half·step/2 + tid·step/8 + j
    tiles = padded.reshape(-1, 8, k // step, 2, 4, step // 8)
    if s4:
        words = np.zeros(tiles.shape[:5], dtype=np.uint32)  # [n_tile, gid, step, half, tid]
        for j in range(8):
            words |= tiles[..., j] << np.uint32(4 * j)
        # → [n_tile, step, gid, tid, half]: the lanes, each with (b0, b1)
        return np.ascontiguousarray(words.transpose(0, 2, 1, 4, 3).reshape(-1, k // step, 32, 2))
    words = np.zeros(tiles.shape[:3] + (4,), dtype=np.uint32)  # [n_tile, gid, step, tid]
    for half in range(2):
        for j in range(4):
            words |= tiles[:, :, :, half, :, j] << np.uint32(16 * half + 4 * j)
    # → [n_tile, step, gid, tid]: the lanes
    return np.ascontiguousarray(words.transpose(0, 2, 1, 3).reshape(-1, k // step, 32))


def pack_weight_scales(scales: torch.Tensor) -> np.ndarray:
    """Weight scales ``[N, K/64]`` (any float dtype) → float32 ``[K/64, Npad]``."""
    n, groups = scales.shape
    out = np.zeros((groups, padded_columns(n)), dtype=np.float32)
    out[:, :n] = scales.detach().float().cpu().numpy().T
    return out
