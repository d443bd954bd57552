"""Independent readers of Nunchaku's packed layouts, for tests.

Each reader computes, for every logical element, where it lives in the packed buffer from the PTX fragment
maps (m16n8k64 and m16n8k16 operand B, the m16n8 accumulator) and Nunchaku's loaders — index arithmetic,
element by element — rather than undoing the packer's reshapes, so a packer that permutes wrongly cannot
agree with it by construction.
"""

from __future__ import annotations

import numpy as np
import torch


def _grid(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(n), np.arange(k), indexing="ij")


def read_w4a4_codes(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """int8 ``[N, K/2]`` → codes ``[N, K]``.

    One warp tile covers 128 channels × 64 k. In it, lane ``4g + t`` owns, per 16-channel pack, channel
    ``g`` of two n8 tiles (``half``) and, per tile, two 32-bit registers: k ``8t…8t+7`` and ``32+8t…``; a
    lane's four registers are contiguous (one 16-byte load), lanes follow each other, then packs, k steps,
    channel tiles. Nibble i of a little-endian register is k offset i.
    """
    n, half_k = packed.shape
    k = half_k * 2
    nn, kk = _grid(n, k)
    tile, pack, half, g = nn // 128, (nn % 128) // 16, (nn % 16) // 8, nn % 8
    step, reg, t, i = kk // 64, (kk % 64) // 32, (kk % 32) // 8, kk % 8
    lane = 4 * g + t
    word = ((((tile * (k // 64) + step) * 8 + pack) * 32 + lane) * 4) + half * 2 + reg
    byte = word * 4 + i // 2
    raw = packed.view(torch.uint8).reshape(-1).numpy()[byte]
    codes = np.where(i % 2 == 0, raw & 0xF, raw >> 4).astype(np.int16)
    if signed:
        codes = np.where(codes >= 8, codes - 16, codes)
    return torch.from_numpy(codes.astype(np.int8))


def read_group_scales(packed: torch.Tensor) -> torch.Tensor:
    """``[G, N]`` → ``[N, G]``. Per 128 channels and group, lane ``l`` holds the accumulator columns of
    its m16n8 fragments, ``2·(l % 4) + {0, 1}`` in each of two n8 tiles of pack ``l // 4``: 4 values."""
    groups, n = packed.shape
    flat = packed.reshape(-1)
    nn, gg = _grid(n, groups)
    tile, within = nn // 128, nn % 128
    pack, half, col = within // 16, (within % 16) // 8, within % 8
    lane = 4 * pack + col // 2
    index = ((tile * groups + gg) * 32 + lane) * 4 + half * 2 + col % 2
    return flat[torch.from_numpy(index)]


def read_vector(packed: torch.Tensor) -> torch.Tensor:
    return read_group_scales(packed.reshape(1, -1)).reshape(-1)


def read_micro_scales(packed: torch.Tensor) -> torch.Tensor:
    """NVFP4 fp8 ``[G16, N]`` → ``[N, G16]``: per 128 channels and 64-wide k step, lane ``4r + q`` holds the
    4 k-groups of channels ``8q + r + 32s`` for s = 0…3 (the scale-factor lane map of block-scaled MMA)."""
    groups, n = packed.shape
    raw = packed.view(torch.uint8).reshape(-1)
    nn, gg = _grid(n, groups)
    tile, within = nn // 128, nn % 128
    s, q, r = within // 32, (within % 32) // 8, within % 8
    step, j = gg // 4, gg % 4
    index = ((((tile * (groups // 4) + step) * 32 + 4 * r + q) * 4 + s) * 4) + j
    return raw[torch.from_numpy(index)].view(packed.dtype)


def read_lora_up(packed: torch.Tensor) -> torch.Tensor:
    """``[N, r]`` in 16×16 tiles ordered (N-tile, r-tile) → ``[N, r]`` (N is the MMA's n, r its k).

    In an m16n8k16 B operand lane ``4g + t`` holds n ``g`` (+8: second n8 tile) and k ``2t, 2t+1`` (+8:
    second register): 8 values, contiguous per lane.
    """
    n, r = packed.shape
    nn, kk = _grid(n, r)
    index = _tile_index(outer=nn // 16, inner=kk // 16, inner_count=r // 16, n=nn % 16, k=kk % 16)
    return packed.reshape(-1)[torch.from_numpy(index)]


def read_lora_down(packed: torch.Tensor) -> torch.Tensor:
    """``[K, r]`` in tiles ordered (K-tile, r-tile), the rank being the MMA's n → ``[r, K]``."""
    k, r = packed.shape
    flat = packed.reshape(-1)
    rr, kk = _grid(r, k)
    index = _tile_index(outer=kk // 16, inner=rr // 16, inner_count=r // 16, n=rr % 16, k=kk % 16)
    return flat[torch.from_numpy(index)]


def _tile_index(outer, inner, inner_count, n, k):
    half, g = n // 8, n % 8
    reg, t, i = k // 8, (k % 8) // 2, k % 2
    lane = 4 * g + t
    return ((outer * inner_count + inner) * 256) + lane * 8 + half * 4 + reg * 2 + i


def read_awq_codes(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[N/4, K/2]`` → unsigned codes ``[N, K]``. Per 32 consecutive k, 16-bit word j holds k
    ``j, 8+j, 16+j, 24+j`` in its four nibbles (low first); per 64 k, four rows' 16 words follow each other."""
    quarter, half_k = packed.shape
    n, k = quarter * 4, half_k * 2
    words = packed.view(torch.int16).reshape(-1).numpy().astype(np.int64) & 0xFFFF
    nn, kk = _grid(n, k)
    chunk64, within = kk // 64, kk % 64
    word_in_row = (within // 32) * 8 + within % 8
    index = ((nn // 4) * (k // 64) + chunk64) * 64 + (nn % 4) * 16 + word_in_row
    nibble = (within % 32) // 8
    return torch.from_numpy(((words[index] >> (4 * nibble)) & 0xF).astype(np.int32))
