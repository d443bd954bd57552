"""Load-time re-packing of an SVDQLinear's weights into the fused GEMM's fragment layout.

Files keep the canonical layout (DESIGN.md §2); kernels/w4a4_gemm.cu wants each lane's B fragment for one
group of 64 along K to be one contiguous 8-byte word pair, and a block's 16 n8 tiles of one group to be one
contiguous 4 KB run (B = Wᵀ, so B[k][n] = W[n][k]; lane = 4·gid + tid, n = n_tile·8 + gid):

    words [K/64, Npad/8, 32, 2] uint32;  b0 = Σ_j code[n, g·64 + tid·8 + j] << 4·j,
                                         b1 = Σ_j code[n, g·64 + 32 + tid·8 + j] << 4·j

b0/b1 are m16n8k64's B registers (sm_80–89); the Hopper path splits each into the two 16-bit halves it widens
for m16n8k32 (see the kernel). N is padded to a multiple of 128 (the kernel's block width) with zero codes and
zero scales. Weight scales become float32 ``[K/64, Npad]``, so a block reads its 128 contiguously.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK_N = 128
BLOCK_M = 128


def padded_columns(out_features: int) -> int:
    return -(-out_features // BLOCK_N) * BLOCK_N


def padded_rows(rows: int) -> int:
    return -(-rows // BLOCK_M) * BLOCK_M


def pack_weight_fragments(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    """Canonical signed codes ``[N, K]`` → uint32 words ``[K/64, Npad/8, 32, 2]``."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    n, k = codes.shape
    if k % 64:
        raise ValueError(f"in_features {k} is not a multiple of 64")
    padded = np.zeros((padded_columns(n), k), dtype=np.uint32)
    padded[:n] = codes.astype(np.int64) & 0xF
    # [n_tile, gid, group, half, tid, j]: k = group·64 + half·32 + tid·8 + j
    tiles = padded.reshape(-1, 8, k // 64, 2, 4, 8)
    words = np.zeros(tiles.shape[:5], dtype=np.uint32)
    for j in range(8):
        words |= tiles[..., j] << np.uint32(4 * j)
    # → [group, n_tile, gid, tid, half]: per group, the tiles, each with its lanes' (b0, b1)
    return np.ascontiguousarray(words.transpose(2, 0, 1, 4, 3).reshape(k // 64, -1, 32, 2))


def pack_weight_scales(scales: torch.Tensor) -> np.ndarray:
    """Weight scales ``[N, K/64]`` (any float dtype) → float32 ``[K/64, Npad]``."""
    n, groups = scales.shape
    out = np.zeros((groups, padded_columns(n)), dtype=np.float32)
    out[:, :n] = scales.detach().float().cpu().numpy().T
    return out
