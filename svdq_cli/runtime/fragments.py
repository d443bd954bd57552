"""Load-time re-packing of an SVDQLinear's weights into the fused GEMM's fragment layout.

Files keep the canonical layout (DESIGN.md §2); kernels/w4a4_gemm.cu wants, for every n8 tile and k32
step, one uint32 per lane holding exactly the eight 4-bit codes that lane feeds ``mma.m16n8k32`` as its B
fragment (PTX ISA: lane = 4·gid + tid owns B[tid·4 .. +3][gid] in b0 and B[16 + tid·4 .. +3][gid] in b1,
with B = Wᵀ so B[k][n] = W[n][k]):

    word[n_tile, k_step, lane] = Σ_j code[n, k_step·32 + tid·4 + j]      << 4·j        (b0, j = 0…3)
                               + Σ_j code[n, k_step·32 + 16 + tid·4 + j] << 16 + 4·j   (b1)
    with n = n_tile·8 + gid

N is padded to a multiple of 64 (the kernel's block width) with zero codes and zero scales. Weight scales
become float32 ``[K/64, Npad]`` so a lane's two adjacent output columns are adjacent in memory.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK_N = 64


def padded_columns(out_features: int) -> int:
    return -(-out_features // BLOCK_N) * BLOCK_N


def pack_weight_fragments(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    """Canonical signed codes ``[N, K]`` → uint32 words ``[Npad/8, K/32, 32]``."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    n, k = codes.shape
    if k % 32:
        raise ValueError(f"in_features {k} is not a multiple of 32")
    padded = np.zeros((padded_columns(n), k), dtype=np.uint32)
    padded[:n] = codes.astype(np.int64) & 0xF
    # [n_tile, gid, k_step, half, tid, j]: k = k_step·32 + half·16 + tid·4 + j
    words = _words(padded.reshape(-1, 8, k // 32, 2, 4, 4))
    # [n_tile, gid, k_step, tid] → [n_tile, k_step, gid, tid] → lanes
    return np.ascontiguousarray(words.transpose(0, 2, 1, 3).reshape(-1, k // 32, 32))


def _words(tiles: np.ndarray) -> np.ndarray:
    """Fold [.., half, tid, j] nibbles into [.., tid] words: bits 16·half + 4·j."""
    words = np.zeros(tiles.shape[:3] + (4,), dtype=np.uint32)
    for half in range(2):
        for j in range(4):
            words |= tiles[:, :, :, half, :, j] << np.uint32(16 * half + 4 * j)
    return words


def pack_weight_scales(scales: torch.Tensor) -> np.ndarray:
    """Weight scales ``[N, K/64]`` (any float dtype) → float32 ``[K/64, Npad]``."""
    n, groups = scales.shape
    out = np.zeros((groups, padded_columns(n)), dtype=np.float32)
    out[:, :n] = scales.detach().float().cpu().numpy().T
    return out
