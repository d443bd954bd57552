"""Independent float64 reference quantizers, written from DESIGN.md §2 with numpy and no svdq code.

The implementation divides in float32; the reference in float64. A value whose float64 ratio lies within
``TIE_TOLERANCE`` of a rounding boundary may legitimately round either way, so comparisons accept both
neighbours there and nowhere else.
"""

from __future__ import annotations

import numpy as np

TIE_TOLERANCE = 1e-5
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def int_reference(x: np.ndarray, group: int, qmax: int, signed: bool, stored_scales: np.ndarray):
    """Codes and near-tie mask of group-wise INT quantization with the given (stored) scales."""
    g = x.reshape(*x.shape[:-1], -1, group).astype(np.float64)
    scale = stored_scales.astype(np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(scale > 0, g / np.where(scale > 0, scale, 1), 0.0)
    low = -(qmax + 1) if signed else 0
    codes = np.clip(np.rint(ratio), low, qmax)
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < TIE_TOLERANCE
    return codes.reshape(x.shape), near_tie.reshape(x.shape)


def int_scales_reference(x: np.ndarray, group: int, qmax: int, signed: bool, full_range: bool = False) -> np.ndarray:
    """``max|x|/qmax`` per group (``max(x)/qmax`` unsigned); with ``full_range``, the scale that maps the
    group's largest value to at most ``qmax`` and its most negative to at least ``-(qmax+1)``."""
    g = x.reshape(*x.shape[:-1], -1, group).astype(np.float64)
    if not signed:
        return np.clip(g, 0, None).max(-1) / qmax
    if full_range:
        return np.maximum(np.clip(g.max(-1), 0, None) / qmax, np.clip(-g.min(-1), 0, None) / (qmax + 1))
    return np.abs(g).max(-1) / qmax


def weighted_error_reference(x: np.ndarray, group: int, qmax: int, scales: np.ndarray, gram: np.ndarray | None):
    """Per group, ``ΔᵀGΔ`` for ``Δ = x − scale·clip(rint(x/scale), −qmax−1, qmax)`` in float64 (``ΔᵀΔ`` when
    ``gram`` is None): the output error on rows whose mean ``x̂ᵀx̂`` within group g is ``gram[g]``."""
    g = x.reshape(*x.shape[:-1], -1, group).astype(np.float64)
    s = scales.astype(np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(s > 0, np.clip(np.rint(g / np.where(s > 0, s, 1)), -qmax - 1, qmax), 0)
    delta = g - codes * s
    if gram is None:
        return (delta**2).sum(-1)
    return np.einsum("ngi,gij,ngj->ng", delta, gram.astype(np.float64), delta)


def low_rank_gram_reference(gram: np.ndarray, rank: int) -> np.ndarray:
    """Each group's Gram matrix as its ``rank`` leading eigenpairs plus the diagonal of the remainder."""
    values, vectors = np.linalg.eigh(gram.astype(np.float64))
    lead = (vectors[..., -rank:] * np.clip(values[..., -rank:], 0, None)[..., None, :]) @ np.swapaxes(
        vectors[..., -rank:], -1, -2)
    rest = np.clip(np.diagonal(gram, axis1=-2, axis2=-1) - np.diagonal(lead, axis1=-2, axis2=-1), 0, None)
    return lead + rest[..., None] * np.eye(gram.shape[-1])


def e2m1_reference(ratio: np.ndarray):
    """E2M1 codes (sign<<3 | index) by nearest magnitude, ties to the even index, saturating at 6."""
    magnitude = np.minimum(np.abs(ratio), 6.0)
    distance = np.abs(magnitude[..., None] - E2M1)
    best = distance.min(-1, keepdims=True)
    candidates = np.isclose(distance, best, rtol=0, atol=1e-12)
    # Prefer the even index among equally near magnitudes.
    preference = np.where(candidates, np.arange(8) % 2, 9)
    index = np.argmin(preference * 16 + np.arange(8), axis=-1)
    sorted_distance = np.sort(distance, axis=-1)
    near_tie = np.abs(sorted_distance[..., 0] - sorted_distance[..., 1]) < TIE_TOLERANCE * np.maximum(1, magnitude)
    sign = (ratio < 0) & (index > 0)
    return index + 8 * sign, near_tie


def unpack_reference(packed: np.ndarray, signed: bool) -> np.ndarray:
    """Nibbles of each byte, low nibble first (even k), sign-extended when ``signed``."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.int64)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    if signed:
        out = np.where(out >= 8, out - 16, out)
    return out
