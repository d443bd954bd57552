"""Canonical low-bit number formats (DESIGN.md §2): group-wise INT4/INT8 and NVFP4.

Every format quantizes groups of ``group_size`` consecutive elements along the last axis, so the same
functions serve weights ``[N, K]`` (groups along K) and per-token activations ``[M, K]``.

- INT: signed codes −8…7 (−128…127 for int8) times a group scale. The scale uses the whole range by
  default, ``max(max x / qmax, −min x / (qmax + 1))`` (``max|x| / qmax`` without ``full_range``); weights may
  instead take a searched, clipping scale (:func:`searched_scales`). Unsigned for non-negative inputs
  (``max(x_group) / 15``, codes 0…15, int4 only). The scale is rounded to its storage
  dtype *before* the codes are computed, so ``codes · stored_scale`` is exactly what a kernel reconstructs;
  where that rounding would clip the group maximum (an fp16 scale that underflows or is subnormal) the
  stored scale is the next representable value up, so ``|x − dq(q(x))| ≤ scale/2`` always holds.
- NVFP4: E2M1 codes (``sign<<3 | magnitude index``) over {0, .5, 1, 1.5, 2, 3, 4, 6}, group 16, one
  float8_e4m3fn scale per group and a float32 second-level scale ``amax / (6·448)`` (per tensor for weights,
  per row for dynamic activations).

Rounding is round-half-to-even everywhere (``torch.round``; CUDA ``__float2int_rn``), and values are divided
by the scale (never multiplied by its reciprocal) so reference and kernels agree code for code. A group of
zeros has scale 0 and codes 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_nibbles

FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
# Magnitudes of the E2M1 codes 0…7.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between consecutive magnitudes. At a tie the even code wins (round half to even on the
# mantissa), so the boundary between codes i and i+1 is inclusive from above exactly when i is odd.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclass(frozen=True)
class Format:
    """A group-wise quantization format.

    Attributes:
        name: ``int4``, ``int8``, ``nvfp4``; ``int2``/``int3`` for weight-only baselines.
        bits: code width.
        group_size: elements sharing one scale, along the last axis.
    """

    name: str
    bits: int
    group_size: int

    @property
    def is_float(self) -> bool:
        return self.name == "nvfp4"

    @property
    def packs_nibbles(self) -> bool:
        return self.bits == 4

    def code_range(self, signed: bool) -> tuple[int, int]:
        """Smallest and largest integer code (INT formats)."""
        if signed:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def scale_divisor(self, signed: bool) -> float:
        """What a group's absolute maximum is divided by to give its scale."""
        return E2M1_MAX if self.is_float else float(self.code_range(signed)[1])


FORMATS: dict[str, Format] = {
    "int4": Format("int4", 4, 64),
    "int8": Format("int8", 8, 64),
    "int2": Format("int2", 2, 64),  # weight-only baselines of the 2- and 3-bit VQ methods (codes stored as int8)
    "int3": Format("int3", 3, 64),
    "nvfp4": Format("nvfp4", 4, 16),
}


def get_format(name: str) -> Format:
    """Look a format up by name; a clear error lists the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r} (allowed: {', '.join(FORMATS)})") from None


@dataclass
class QTensor:
    """Quantized tensor in the canonical (unpacked) form.

    Attributes:
        codes: int8 codes, same shape as the input.
        scales: per-group scales ``[..., K/group]`` (storage dtype; float8_e4m3fn for NVFP4).
        fmt: the format.
        signed: signed (or unsigned) INT codes; always True for NVFP4 (the sign is in the code).
        tensor_scale: NVFP4 float32 second-level scale (0-d, or ``[..., 1]`` per row); None for INT.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: Format
    signed: bool = True
    tensor_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.fmt, self.tensor_scale)

    def packed(self) -> torch.Tensor:
        """Codes as stored on disk: two per byte for 4-bit formats, int8 for int8."""
        return pack_nibbles(self.codes) if self.fmt.packs_nibbles else self.codes.to(torch.int8)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.shape[-1] % group_size:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the group size {group_size}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def nvfp4_tensor_scale(x: torch.Tensor, per_row: bool = False, storage: torch.dtype | None = None) -> torch.Tensor:
    """NVFP4 second-level scale ``amax / (6·448)`` in float32, for the whole tensor or per row; with
    ``storage``, the nearest value at or above it that ``storage`` holds exactly (an engine that keeps the
    tensor scale in 16 bits then applies the very scale the codes were made for; the group scales stay
    within fp8's range since the tensor scale only grew)."""
    amax = x.detach().abs().float()
    amax = amax.amax(dim=-1, keepdim=True) if per_row else amax.amax()
    scale = amax / (E2M1_MAX * FP8_E4M3_MAX)
    if storage is None:
        return scale
    stored = scale.to(storage)
    stored = torch.where(stored.float() < scale, _next_up(stored), stored)
    return stored.float()


def group_scales(
    x: torch.Tensor,
    fmt: Format,
    signed: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    tensor_scale: torch.Tensor | None = None,
    full_range: bool = True,
) -> torch.Tensor:
    """Per-group scales of ``x`` in their storage dtype (float8_e4m3fn for NVFP4).

    Signed INT scales use the whole code range with ``full_range``: ``max(max x / qmax, −min x / (qmax+1))``, so
    a group whose extreme is negative reaches code −8 (−128) and gets a finer step; without it,
    ``max|x| / qmax`` (code −8 unused). Either way no element lies beyond the codes.

    Raises:
        ValueError: the scale does not fit its storage dtype (INT scales in fp16, say).
    """
    grouped = _grouped(x.detach().float(), fmt.group_size)
    low, high = torch.aminmax(grouped, dim=-1)  # no |x| temporary the size of x
    if not torch.isfinite(low).all() or not torch.isfinite(high).all():  # NaN and Inf both survive a max
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    if fmt.is_float:
        if tensor_scale is None:
            raise ValueError("NVFP4 needs a tensor scale")
        amax = torch.maximum(-low, high)
        ts = tensor_scale.float()  # 0-d, or [..., 1] per row: broadcasts against [..., groups]
        safe_ts = torch.where(ts > 0, ts, torch.ones_like(ts))
        ratio = torch.where(ts > 0, amax / E2M1_MAX / safe_ts, torch.zeros_like(amax))
        return ratio.clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    qmax = fmt.code_range(signed)[1]
    positive, negative = high.clamp(min=0), (-low).clamp(min=0)
    if not signed:
        negative = torch.zeros_like(negative)
    negative_divisor = qmax + 1 if signed and full_range else qmax
    scales = torch.maximum(positive / qmax, negative / negative_divisor).to(scale_dtype)
    if not torch.isfinite(scales).all():
        raise ValueError(f"a group scale overflows {scale_dtype}; store scales in float32")
    # A scale that rounded down far enough to clip the group's extremes (only possible when it underflows
    # or is subnormal in the storage dtype) goes one representable step up instead.
    stored = scales.float()
    clips = (stored * (qmax + 0.5) < positive) | (stored * (negative_divisor + 0.5) < negative)
    if clips.any():
        scales = torch.where(clips, _next_up(scales), scales)
    return scales


# Shrink factors the weight-scale search tries on the full-range scale; 1.0 never clips, smaller ones clip the
# group's extremes for a finer step everywhere else.
SHRINK_FACTORS = (1.0, 0.9, 0.8, 0.7)


GRAM_RANK = 2  # eigenpairs of a group's input Gram matrix the scale search keeps (plus the rest's diagonal)


def gram_factors(gram: torch.Tensor, rank: int = GRAM_RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """A cheap form of each group's Gram matrix ``G [groups, g, g]``: ``G ≈ diag(d) + F Fᵀ`` with ``F [groups, g,
    rank]`` its leading eigenvectors scaled by √eigenvalue and ``d`` the diagonal of what they leave. It keeps
    what dominates real inputs' correlation within a group (a shared mean after a GELU: the leading direction)
    while ``ΔᵀGΔ`` costs ``rank + 1`` passes over Δ instead of ``g``. On the synthetic FLUX-shaped layers the
    scales it picks give held-out errors within 0.5% of the exact Gram's."""
    values, vectors = torch.linalg.eigh(gram.double())  # ascending
    factors = vectors[..., -rank:] * values[..., -rank:].clamp(min=0).sqrt().unsqueeze(-2)
    rest = torch.diagonal(gram.double(), dim1=-2, dim2=-1) - factors.square().sum(-1)
    return rest.clamp(min=0).float(), factors.float()


def searched_scales(
    x: torch.Tensor,
    fmt: Format,
    gram: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
    chunk_elements: int = 1 << 19,
    factored: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per group of a weight ``x [N, K]``, the signed INT scale with the least error among: ``max|x|/qmax``
    (the symmetric rule) and the full-range scale times each of :data:`SHRINK_FACTORS` (as stored).

    The error of a group's rounding ``Δ = x − dequant(quant(x))`` is the layer's output error on its calibration
    rows, ``ΔᵀGΔ`` with ``gram [K/group, group, group]`` the mean ``x̂ᵀx̂`` of its inputs within each group (in
    the :func:`gram_factors` form, which ``factored`` may pass ready-made: cross terms within a group count,
    which matters where inputs share a large mean, as after a GELU, and same-signed clipping errors add up), or
    ``ΔᵀΔ`` without calibration rows. Ties keep the earlier candidate, so the choice is deterministic and never
    worse on this measure than the symmetric or the full-range scale.
    """
    if fmt.is_float:
        raise ValueError("the scale search is for INT formats")
    diagonal, factors = factored or (gram_factors(gram) if gram is not None else (None, None))
    chosen, chunk_rows = [], max(1, chunk_elements // x.shape[1])
    for start in range(0, x.shape[0], chunk_rows):  # a few MB at a time: the candidates stay in cache
        grouped = _grouped(x[start : start + chunk_rows].detach().float(), fmt.group_size)
        flat = grouped.flatten(-2)
        full = group_scales(flat, fmt, True, scale_dtype, full_range=True)
        candidates = [group_scales(flat, fmt, True, scale_dtype, full_range=False), full]
        candidates += [(full.float() * factor).to(scale_dtype) for factor in SHRINK_FACTORS[1:]]
        best, best_error = None, None
        for scales in candidates:
            step = scales.float().unsqueeze(-1)
            delta = grouped - _rounded(divide_by_step(grouped, step), fmt, True).mul_(step)  # [n, G, group]
            if diagonal is None:
                error = torch.linalg.vector_norm(delta, dim=-1).square_()
            else:  # Δᵀ diag(d) Δ + |Fᵀ Δ|², per group, as one reduction each
                error = torch.einsum("ngi,gi->ng", delta.square(), diagonal)
                error += torch.einsum("ngi,gif->ngf", delta, factors).square_().sum(-1)
            if best is None:
                best, best_error = scales, error
                continue
            better = error < best_error
            best, best_error = torch.where(better, scales, best), torch.where(better, error, best_error)
        chosen.append(best)
    return torch.cat(chosen)


def _next_up(values: torch.Tensor) -> torch.Tensor:
    """The next representable value above each non-negative float (bit patterns of positive floats are
    ordered like integers; a −0, which a maximum of zeros can return, counts as +0)."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    return (values.abs().view(as_int) + 1).view(values.dtype)


def _e2m1_index(magnitude: torch.Tensor) -> torch.Tensor:
    index = torch.zeros_like(magnitude, dtype=torch.int8)
    for i, midpoint in enumerate(_E2M1_MIDPOINTS):
        above = magnitude >= midpoint if i % 2 else magnitude > midpoint
        index += above.to(torch.int8)
    return index


def effective_step(scales: torch.Tensor, fmt: Format, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """Float32 distance between adjacent integer codes (INT) or the E2M1 unit (NVFP4), per group."""
    step = scales.float()
    if fmt.is_float:
        step = step * tensor_scale.float()
    return step


def codes_for(ratio: torch.Tensor, fmt: Format, signed: bool = True) -> torch.Tensor:
    """Codes of values already divided by their step (round half to even; saturating)."""
    if fmt.is_float:
        index = _e2m1_index(ratio.abs())
        negative = (ratio < 0) & (index > 0)  # no negative zero: zero is always code 0
        return index | (negative.to(torch.int8) << 3)
    low, high = fmt.code_range(signed)
    return torch.round(ratio).clamp_(low, high).to(torch.int8)


def code_values(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Float32 value of each code, in units of its step."""
    if not fmt.is_float:
        return codes.float()
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    magnitude = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def divide_by_step(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``x / step`` with 0 wherever the step is 0 (an all-zero group).

    A zero step becomes +inf on the small step tensor, so finite x divides to 0 without a pass of
    ``torch.where`` over x itself.
    """
    return x / torch.where(step > 0, step, torch.full_like(step, float("inf")))


def quantize_with_scales(
    x: torch.Tensor,
    scales: torch.Tensor,
    fmt: Format,
    signed: bool = True,
    tensor_scale: torch.Tensor | None = None,
    chunk_elements: int = 1 << 20,
) -> torch.Tensor:
    """Codes of ``x`` for given per-group scales (computed a few MB of rows at a time: a FLUX-size weight
    needs no float32 temporaries of its own size)."""
    if x.dim() < 2 or (tensor_scale is not None and tensor_scale.dim() and tensor_scale.shape[0] != x.shape[0]):
        return _codes(x, scales, fmt, signed, tensor_scale)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    rows = max(1, chunk_elements // max(1, x[0].numel()))
    for start in range(0, x.shape[0], rows):
        part = None if tensor_scale is None or not tensor_scale.dim() else tensor_scale[start : start + rows]
        codes[start : start + rows] = _codes(x[start : start + rows], scales[start : start + rows], fmt, signed,
                                             tensor_scale if part is None else part)
    return codes


def _codes(x, scales, fmt, signed, tensor_scale) -> torch.Tensor:
    grouped = _grouped(x.detach().float(), fmt.group_size)
    step = effective_step(scales, fmt, tensor_scale).unsqueeze(-1)
    return codes_for(divide_by_step(grouped, step), fmt, signed).reshape(x.shape)


def quantize(
    x: torch.Tensor,
    fmt: Format,
    signed: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    per_row_tensor_scale: bool = False,
    full_range: bool = True,
    tensor_scale_dtype: torch.dtype | None = None,
) -> QTensor:
    """Quantize ``x`` group-wise along its last axis.

    Args:
        x: tensor ``[..., K]``, K divisible by the format's group size; any float dtype.
        fmt: the format (see :data:`FORMATS`).
        signed: signed codes; False quantizes non-negative inputs with unsigned codes 0…15 (int4 only;
            negative values clamp to 0).
        scale_dtype: storage dtype of INT scales (the model dtype, or float32). NVFP4 scales are fp8.
        per_row_tensor_scale: NVFP4 second-level scale per row (dynamic activations) instead of per tensor.
        full_range: signed INT scales reach code −8 when a group's extreme is negative (see
            :func:`group_scales`).
        tensor_scale_dtype: NVFP4: a tensor scale exactly representable in this dtype (see
            :func:`nvfp4_tensor_scale`).

    Returns:
        The :class:`QTensor`.

    Raises:
        ValueError: K not divisible by the group size, non-finite input, or unsigned codes for a format
            other than int4.
    """
    if not signed and fmt.name != "int4":
        raise ValueError(f"unsigned codes exist for int4 only ({fmt.name} codes are always signed)")
    tensor_scale = nvfp4_tensor_scale(x, per_row_tensor_scale, tensor_scale_dtype) if fmt.is_float else None
    scales = group_scales(x, fmt, signed, scale_dtype, tensor_scale, full_range)
    codes = quantize_with_scales(x, scales, fmt, signed, tensor_scale)
    return QTensor(codes, scales, fmt, signed, tensor_scale)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    fmt: Format,
    tensor_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruct float32 values from unpacked codes and group scales."""
    grouped = code_values(_grouped(codes, fmt.group_size), fmt)
    step = effective_step(scales, fmt, tensor_scale).unsqueeze(-1)
    return (grouped * step).reshape(codes.shape)


def fake_quantize(
    x: torch.Tensor,
    fmt: Format,
    signed: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    per_row_tensor_scale: bool = False,
    full_range: bool = True,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float32: what the quantized model actually sees.

    INT formats stay in float32 throughout (codes are small integers, exact in float32), which gives the same
    values as the round trip through int8 codes in fewer passes: the smoothing search calls this dozens of
    times per layer.
    """
    if fmt.is_float:
        return quantize(x, fmt, signed, scale_dtype, per_row_tensor_scale, full_range).dequantize()
    if not signed and fmt.name != "int4":
        raise ValueError(f"unsigned codes exist for int4 only ({fmt.name} codes are always signed)")
    step = group_scales(x, fmt, signed, scale_dtype, full_range=full_range).float().unsqueeze(-1)
    return (_rounded(divide_by_step(_grouped(x.detach().float(), fmt.group_size), step), fmt, signed)
            .mul_(step).reshape(x.shape))


def _rounded(ratio: torch.Tensor, fmt: Format, signed: bool) -> torch.Tensor:
    """INT codes as float32 (round half to even, saturating), in place on ``ratio``."""
    low, high = fmt.code_range(signed)
    return torch.round(ratio, out=ratio).clamp_(low, high)


def engine_activation_codes(x: torch.Tensor, fmt: Format, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Nunchaku's dynamic activation rule: codes ``[..., K]`` (int8) and the stored group scales.

    Signed INT4 groups take ``s = max|x|·(1/7)`` in float32 and store it in ``dtype`` (the compute dtype);
    NVFP4 groups take ``min(max|x|·(1/6), 448)`` and store it in fp8, with no per-token tensor scale. Either
    way the codes come from the *unrounded* scale (``round(x · (1/s))``), as the kernel computes them; an
    all-zero group has scale 0 and codes 0.
    """
    grouped = _grouped(x.detach().float(), fmt.group_size)
    inverse, stored = _engine_scales(grouped, fmt, dtype)
    codes = codes_for(grouped * inverse, fmt, signed=True)
    return codes.reshape(x.shape), stored.squeeze(-1)


def engine_fake_quantize(x: torch.Tensor, fmt: Format, dtype: torch.dtype) -> torch.Tensor:
    """What Nunchaku's GEMM sees of ``x`` under :func:`engine_activation_codes`, in float32. The kernel holds
    ``x`` in ``dtype`` (it smooths in 16 bits), so a near-tie rounds as it does there. INT codes stay in
    float32 (the smoothing search calls this dozens of times per layer)."""
    grouped = _grouped(x.detach().to(dtype).float(), fmt.group_size)
    inverse, stored = _engine_scales(grouped, fmt, dtype)
    if fmt.is_float:
        values = code_values(codes_for(grouped * inverse, fmt, signed=True), fmt)
    else:
        values = _rounded(grouped.mul_(inverse), fmt, True)
    return values.mul_(stored.float()).reshape(x.shape)


def _engine_scales(grouped: torch.Tensor, fmt: Format, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``grouped`` ``[..., groups, size]``: the reciprocal of the unrounded scale (0 for an
    all-zero group) and the scale as stored, both ``[..., groups, 1]``."""
    amax = grouped.abs().amax(dim=-1, keepdim=True)
    if fmt.is_float:
        scale = (amax * torch.tensor(1 / E2M1_MAX, dtype=torch.float32)).clamp(max=FP8_E4M3_MAX)
        stored = scale.to(torch.float8_e4m3fn)
    else:
        scale = amax * torch.tensor(1 / fmt.code_range(True)[1], dtype=torch.float32)
        stored = scale.to(dtype)
    return torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale)), stored
