"""GPTQ (Frantar et al., 2022) for the residual weight, group-wise scales (DESIGN.md §1 step 3).

Columns are quantized left to right; each column's rounding error is spread over the columns not yet
quantized through the inverse Hessian ``H = X̂ᵀX̂`` of the (smoothed) calibration inputs, so the layer
*output* error, not the weight error, is what gets minimised. A group's scale is fixed from the updated
weights when the sweep enters that group, as in the reference implementation's ``groupsize`` mode.
"""

from __future__ import annotations

import torch

from .formats import (
    Format,
    QTensor,
    code_values,
    codes_for,
    divide_by_step,
    effective_step,
    group_scales,
    nvfp4_tensor_scale,
    searched_scales,
)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹``, in float64 for stability."""
    h = hessian.double().clone()
    h += torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (damp * h.diagonal().mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as error:
        raise ValueError(f"GPTQ Hessian is not positive definite even after damping ({error})") from None


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: Format,
    scale_dtype: torch.dtype = torch.float32,
    block_size: int = 128,
    damp: float = 0.01,
    full_range: bool = True,
    scale_search: bool = False,
    tensor_scale_dtype: torch.dtype | None = None,
) -> QTensor:
    """Quantize ``weight`` [N, K] with GPTQ.

    Args:
        weight: the weight (the residual, for SVDQuant), any float dtype.
        hessian: ``[K, K]`` sum of ``x̂ᵀx̂`` over calibration rows (any positive scale).
        fmt: target format; scales are group-wise along K as in :func:`formats.quantize`.
        scale_dtype: storage dtype of INT scales.
        block_size: lazy-batch width, a multiple of the group size.
        damp: dampening as a fraction of the mean Hessian diagonal.
        full_range: signed INT scales over the whole code range (see :func:`formats.group_scales`).
        scale_search: each group's scale searched on entry (:func:`formats.searched_scales`), weighing its
            error by the group's block of the Hessian.
        tensor_scale_dtype: NVFP4: a tensor scale exactly representable in this dtype.

    Returns:
        A :class:`QTensor` in the same canonical form as round-to-nearest produces.
    """
    n, k = weight.shape
    group = fmt.group_size
    if hessian.shape != (k, k):
        raise ValueError(f"GPTQ Hessian has shape {tuple(hessian.shape)}, expected {(k, k)}")
    if block_size % group:
        raise ValueError(f"GPTQ block size {block_size} is not a multiple of the group size {group}")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0  # channels never excited carry no output error: quantize them as they are
    h[dead, dead] = 1.0
    h_inv = _inverse_hessian_factor(h, damp)

    tensor_scale = nvfp4_tensor_scale(weight, storage=tensor_scale_dtype) if fmt.is_float else None
    codes = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    scales = torch.empty(
        (n, k // group), dtype=torch.float8_e4m3fn if fmt.is_float else scale_dtype, device=weight.device
    )
    for start in range(0, k, block_size):
        stop = min(start + block_size, k)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % group == 0:
                g = column // group
                if scale_search and not fmt.is_float:
                    gram = h[column : column + group, column : column + group].float()[None]
                    scales[:, g : g + 1] = searched_scales(block[:, i : i + group], fmt, gram, scale_dtype)
                else:
                    scales[:, g : g + 1] = group_scales(block[:, i : i + group], fmt, True, scale_dtype,
                                                        tensor_scale, full_range)
            step = effective_step(scales[:, column // group], fmt, tensor_scale).double()
            q = codes_for(divide_by_step(block[:, i], step), fmt)
            codes[:, column] = q
            dequantized = code_values(q, fmt).double() * step
            error = (block[:, i] - dequantized) / h_block[i, i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ h_inv[start:stop, stop:]
    return QTensor(codes, scales, fmt, True, tensor_scale)
