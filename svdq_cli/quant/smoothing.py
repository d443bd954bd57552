"""Smoothing: migrate activation outliers into the weights (DESIGN.md §1 step 1).

``λ_j = max|x_j|^α / max|W_:,j|^β``; the layer then computes ``(x/λ)(W·diag(λ))ᵀ``, which is the same
function with the outlier channels of x shrunk and the matching weight columns grown.
"""

from __future__ import annotations

import torch

# Channels whose statistics are this small are treated as dead: their factor is 1.
_DEAD = 1e-8


def weight_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """Per-input-channel ``max|W_:,j|`` over all layers that read the same input."""
    extremes = [torch.aminmax(w.detach(), dim=0) for w in weights]  # no |W| temporary of the weight's size
    return torch.stack([torch.maximum(-low, high).float() for low, high in extremes]).amax(dim=0)


def smooth_factors(
    act_absmax: torch.Tensor,
    w_absmax: torch.Tensor,
    alpha: float,
    beta: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Smoothing factors λ ``[K]``, rounded to ``dtype`` and returned as float32.

    They are rounded to the dtype they will be stored in *before* anyone uses them, so the smoothed
    weight is built with exactly the λ the runtime divides activations by.

    Args:
        act_absmax: per-channel ``max|x_j|`` over the calibration tokens.
        w_absmax: per-channel ``max|W_:,j|`` (see :func:`weight_absmax`).
        alpha, beta: exponents; α = β = 0 gives λ = 1 (no smoothing).
        dtype: storage dtype of λ (the model dtype).
    """
    if act_absmax.shape != w_absmax.shape:
        raise ValueError(
            f"activation statistics {tuple(act_absmax.shape)} do not match weights {tuple(w_absmax.shape)}"
        )
    act = act_absmax.float()
    wgt = w_absmax.float()
    live = (act > _DEAD) & (wgt > _DEAD)
    factors = act.clamp(min=_DEAD).pow(alpha) / wgt.clamp(min=_DEAD).pow(beta)
    factors = torch.where(live, factors, torch.ones_like(factors))
    # Keep λ inside what the storage dtype can hold, with room for the division by λ.
    finfo = torch.finfo(dtype)
    factors = factors.clamp(min=finfo.tiny * 1e3, max=finfo.max / 1e3)
    return factors.to(dtype).float()
