"""NF4 ("4-bit NormalFloat", Dettmers et al., QLoRA): the 16 levels of bitsandbytes' NF4 codebook, spaced for
normally distributed weights, times one absmax per block of 64 consecutive weights along K, kept in float32 (no
double quantization). It is the paper's W4A16 baseline for FLUX (diffusers' bitsandbytes ``nf4`` at blocksize
64), measured here as a baseline only: no export writes it.

A weight rounds to the nearest level of ``w / absmax``; a block of zeros has absmax 0 and code 7 (the level 0).
"""

from __future__ import annotations

import torch

from .packing import pack_nibbles, unpack_nibbles

BLOCK = 64
LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
          -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
          0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
          1.0)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` (K a multiple of 64) → packed codes uint8 ``[N, K/2]`` and absmax float32 ``[N, K/64]``.

    Raises:
        ValueError: K not a multiple of the block.
    """
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"NF4 blocks of {BLOCK} do not divide K = {k}")
    blocks = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    absmax = blocks.abs().amax(dim=-1)
    normalized = blocks / torch.where(absmax > 0, absmax, 1.0).unsqueeze(-1)
    levels = torch.tensor(LEVELS, device=weight.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(normalized, midpoints)  # the nearest level (a tie, of measure zero, goes up)
    return pack_nibbles(codes.reshape(n, k)), absmax


def dequantize(packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The float32 weight ``[N, K]`` the codes and absmax give."""
    codes = unpack_nibbles(packed, signed=False).long()
    n, k = codes.shape
    levels = torch.tensor(LEVELS, device=packed.device)[codes].reshape(n, k // BLOCK, BLOCK)
    return (levels * absmax.float().unsqueeze(-1)).reshape(n, k)
