"""Canonical nibble packing of 4-bit codes (DESIGN.md §2).

Two codes per byte along the last axis, **low nibble = even k**:
``byte[..., j] = (q[..., 2j] & 0xF) | (q[..., 2j+1] & 0xF) << 4``. The same packing serves signed INT4
codes (−8…7), unsigned INT4 codes (0…15) and NVFP4 codes (sign<<3 | magnitude index).
"""

from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes, two per byte, low nibble first.

    Args:
        codes: integer tensor whose last dimension is even; values in −8…15 (only the low 4 bits are kept,
            so signed and unsigned codes pack the same way).

    Returns:
        uint8 tensor with the last dimension halved.

    Raises:
        ValueError: odd last dimension, or codes outside −8…15.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of 4-bit codes along the last axis ({codes.shape[-1]})")
    if codes.numel() and (codes.min() < -8 or codes.max() > 15):
        raise ValueError("4-bit codes must lie in -8..15")
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`.

    Args:
        packed: uint8 tensor of packed codes.
        signed: sign-extend each nibble to −8…7 (INT4 weights and signed activations); otherwise return
            0…15 (unsigned activations, NVFP4 codes).

    Returns:
        int8 tensor with the last dimension doubled.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    codes = torch.stack((low, high), dim=-1).flatten(-2)
    if signed:
        codes = (codes ^ 8) - 8  # two's-complement sign extension of a nibble
    return codes
