"""Nunchaku's on-disk tensor layouts, produced from our canonical tensors (pure tensor code).

Nunchaku's W4A4 GEMM loads every operand straight into tensor-core fragments, so its files store them in
fragment order rather than row-major. Shapes and orders below follow its loaders and PTX's fragment maps:

- **4-bit weights** ``[N, K]`` → int8 ``[N, K/2]``. A warp owns 128 output channels and a 64-wide k step;
  lane ``4·g + t`` of the m16n8k64 B fragment holds column ``g`` of an n8 tile and k ``8t…8t+7`` (first
  register) and ``32+8t…`` (second). One lane's 16-byte load covers two n8 tiles × two registers, low
  nibble first. N pads to 128 and K to 128 (the kernel unrolls two k steps).
- **Group scales** ``[N, G]`` → ``[G, N]``: per 128 channels and group, lane ``l`` holds the accumulator
  columns it owns, ``{0, 1, 8, 9} + 16·(l // 4) + 2·(l % 4)``.
- **NVFP4 micro-scales** (fp8 per 16 k) → per 128 channels and 64-wide k step, lane ``4·r + q`` holds
  channels ``8q + r + {0, 32, 64, 96}``, each with its 4 k-groups.
- **Per-channel vectors** (bias, smoothing factors): the scale order with one group.
- **Low-rank factors**: ``lora_down`` ``[K, r]`` and ``lora_up`` ``[N, r]`` in 16×16 fp16 MMA tiles; r pads
  to 16.
- **W4A16 (AWQ GEMV) weights** for the AdaLN linears: unsigned codes, ``w = q·scale + zero``; int32
  ``[N/4, K/2]`` with rows interleaved in fours per 64-wide k chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WARP_N = 128  # output channels per warp tile
K_UNROLL = 128  # K multiple the W4A4 kernel needs: two 64-wide k steps
LORA_TILE = 16  # low-rank factors are stored in 16×16 tiles
AWQ_GROUP = 64


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pad_to(tensor: torch.Tensor, sizes: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    """Pad the trailing edge of each dimension of ``tensor`` up to ``sizes``."""
    widths = []
    for have, want in reversed(list(zip(tensor.shape, sizes, strict=True))):
        widths += [0, want - have]
    if not any(widths):
        return tensor
    if tensor.dtype == torch.float8_e4m3fn:  # F.pad does not take fp8: pad its bytes
        byte = torch.tensor(value, dtype=tensor.dtype).view(torch.uint8).item()
        return F.pad(tensor.view(torch.uint8), widths, value=byte).view(tensor.dtype)
    return F.pad(tensor, widths, value=value)


def pack_w4a4_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[N, K]`` (signed −8…7 or E2M1 nibbles 0…15), N and K padded → int8 ``[N, K/2]``."""
    n, k = codes.shape
    _check_multiple("weight rows", n, WARP_N)
    _check_multiple("weight columns", k, K_UNROLL)
    nibbles = (codes.to(torch.int32) & 0xF)
    # n = tile·128 + pack·16 + half·8 + g;  k = step·64 + reg·32 + t·8 + i
    view = nibbles.reshape(n // WARP_N, 8, 2, 8, k // 64, 2, 4, 8)
    #          tile, step, pack, g, t, half, reg, i  (lane = 4g + t; i = nibble within the 32-bit register)
    ordered = view.permute(0, 4, 1, 3, 6, 2, 5, 7)
    words = (ordered << (4 * torch.arange(8, dtype=torch.int32))).sum(dim=-1, dtype=torch.int32)
    return words.contiguous().view(torch.int8).reshape(n, k // 2)  # little-endian words, as the GPU reads them


def pack_group_scales(scales: torch.Tensor) -> torch.Tensor:
    """Per-group 16-bit scales ``[N, G]`` (N padded to 128) → ``[G, N]`` in fragment order."""
    n, groups = scales.shape
    _check_multiple("scale rows", n, WARP_N)
    # n = tile·128 + a·16 + b·8 + c·2 + d; lane 4a + c holds (b, d)
    view = scales.reshape(n // WARP_N, 8, 2, 4, 2, groups)
    return view.permute(0, 5, 1, 3, 2, 4).contiguous().reshape(groups, n)


def pack_vector(values: torch.Tensor) -> torch.Tensor:
    """A per-channel vector ``[N]`` (bias, smoothing) → ``[N]`` in the scale order of one group."""
    return pack_group_scales(values.reshape(-1, 1)).reshape(-1)


def pack_micro_scales(scales: torch.Tensor) -> torch.Tensor:
    """NVFP4 fp8 scales ``[N, K/16]`` (N padded to 128, K to 64) → ``[K/16, N]`` in fragment order."""
    n, groups = scales.shape
    _check_multiple("scale rows", n, WARP_N)
    _check_multiple("scale groups", groups, 4)
    raw = scales.view(torch.uint8)
    # n = tile·128 + s·32 + q·8 + r; group = step·4 + j; lane 4r + q holds (s, j)
    view = raw.reshape(n // WARP_N, 4, 4, 8, groups // 4, 4)
    ordered = view.permute(0, 4, 3, 2, 1, 5).contiguous()
    return ordered.reshape(groups, n).view(scales.dtype)


def _fragment_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """``(A, B, 16 n, 16 k)`` 16-bit tiles → each tile in m16n8k16 fragment order, flattened.

    Within a tile n = half·8 + g and k = reg·8 + t·2 + i; lane 4g + t holds (half, reg, i).
    """
    a, b = tiles.shape[:2]
    view = tiles.reshape(a, b, 2, 8, 2, 4, 2)
    return view.permute(0, 1, 3, 5, 2, 4, 6).contiguous()


def pack_lora_down(down: torch.Tensor, k_padded: int, rank_padded: int) -> torch.Tensor:
    """``lora_down [r, K]`` (acting on the raw input) → Nunchaku's ``[K_pad, r_pad]``.

    The down-projection's MMA has the rank as n and K as its reduction; tiles run over (K, r).
    """
    padded = pad_to(down, (rank_padded, k_padded))
    r, k = padded.shape
    tiles = padded.reshape(r // 16, 16, k // 16, 16).permute(2, 0, 1, 3)
    return _fragment_tiles(tiles).reshape(k, r)


def pack_lora_up(up: torch.Tensor, n_padded: int, rank_padded: int) -> torch.Tensor:
    """``lora_up [N, r]`` → Nunchaku's ``[N_pad, r_pad]`` (N is the MMA's n, r its reduction)."""
    padded = pad_to(up, (n_padded, rank_padded))
    n, r = padded.shape
    tiles = padded.reshape(n // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    return _fragment_tiles(tiles).reshape(n, r)


def pack_awq_codes(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``[N, K]`` → int32 ``[N/4, K/2]`` for the W4A16 GEMV kernel."""
    n, k = codes.shape
    _check_multiple("W4A16 rows", n, 4)
    _check_multiple("W4A16 columns", k, 64)
    # within 32 consecutive k: 16-bit word j holds k = j, 8+j, 16+j, 24+j (4 bits each, in that order)
    chunks = codes.to(torch.int32).reshape(n, k // 32, 4, 8)
    halves = (chunks << (4 * torch.arange(4, dtype=torch.int32)).view(1, 1, 4, 1)).sum(dim=2)  # [n, k/32, 8]
    # four rows interleave per 64-wide chunk of k: [n/4, k/64, 4 rows, 16 halves]
    rows = halves.reshape(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).contiguous()
    return rows.to(torch.int16).view(torch.int32).reshape(n // 4, k // 2)


def _check_multiple(what: str, value: int, multiple: int) -> None:
    if value % multiple:
        raise ValueError(f"{what} ({value}) must be a multiple of {multiple}; pad first")


# --- readers: each packer undone (the CPU stand-in of the Lite kernels reads checkpoints with them) ----------

def unpack_w4a4_codes(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """int8 ``[N, K/2]`` in fragment order → 4-bit codes ``[N, K]`` (int8: −8…7 when ``signed``, else 0…15)."""
    n, half_k = packed.shape
    k = half_k * 2
    words = packed.contiguous().view(torch.int32).reshape(n // WARP_N, k // 64, 8, 8, 4, 2, 2)
    nibbles = (words.unsqueeze(-1) >> (4 * torch.arange(8, dtype=torch.int32))) & 0xF
    # tile, step, pack, g, t, half, reg, i → tile, pack, half, g, step, reg, t, i
    codes = nibbles.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k)
    if signed:
        codes = torch.where(codes >= 8, codes - 16, codes)
    return codes.to(torch.int8)


def unpack_group_scales(packed: torch.Tensor) -> torch.Tensor:
    """``[G, N]`` in fragment order → ``[N, G]``."""
    groups, n = packed.shape
    view = packed.reshape(n // WARP_N, groups, 8, 4, 2, 2)  # tile, group, a, c, b, d
    return view.permute(0, 2, 4, 3, 5, 1).reshape(n, groups)


def unpack_vector(packed: torch.Tensor) -> torch.Tensor:
    return unpack_group_scales(packed.reshape(1, -1)).reshape(-1)


def unpack_micro_scales(packed: torch.Tensor) -> torch.Tensor:
    """NVFP4 fp8 ``[K/16, N]`` in fragment order → ``[N, K/16]``."""
    groups, n = packed.shape
    view = packed.contiguous().view(torch.uint8).reshape(n // WARP_N, groups // 4, 8, 4, 4, 4)  # tile, step, r, q, s, j
    return view.permute(0, 4, 3, 2, 1, 5).reshape(n, groups).view(packed.dtype)


def _tiles_of_fragments(flat: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Inverse of :func:`_fragment_tiles`: ``(A, B, 16 n, 16 k)`` tiles back from fragment order."""
    view = flat.reshape(a, b, 8, 4, 2, 2, 2)  # g, t, half, reg, i
    return view.permute(0, 1, 4, 2, 5, 3, 6).reshape(a, b, 16, 16)


def unpack_lora_down(packed: torch.Tensor) -> torch.Tensor:
    """``[K, r]`` in 16×16 fragment tiles → ``lora_down [r, K]``."""
    k, r = packed.shape
    tiles = _tiles_of_fragments(packed, k // 16, r // 16)  # (K tile, r tile, r, k)
    return tiles.permute(1, 2, 0, 3).reshape(r, k)


def unpack_lora_up(packed: torch.Tensor) -> torch.Tensor:
    """``[N, r]`` in 16×16 fragment tiles → ``lora_up [N, r]``."""
    n, r = packed.shape
    tiles = _tiles_of_fragments(packed, n // 16, r // 16)  # (N tile, r tile, n, r)
    return tiles.permute(0, 2, 1, 3).reshape(n, r)


def unpack_awq_codes(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[N/4, K/2]`` → unsigned W4A16 codes ``[N, K]`` (int32, 0…15)."""
    quarter, half_k = packed.shape
    n, k = quarter * 4, half_k * 2
    halves = packed.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    rows = halves.reshape(quarter, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(n, k // 32, 1, 8)
    nibbles = (rows >> (4 * torch.arange(4, dtype=torch.int32)).view(1, 1, 4, 1)) & 0xF  # [n, k/32, 4, 8]
    return nibbles.reshape(n, k)
