"""SVDQuant for one layer or one group of layers sharing an input (DESIGN.md §1 steps 1–3).

:func:`search_smoothing` picks α/β by the layer-output error measured with the low-rank branch and the
4-bit quantization of weights and activations in the loop; :func:`branch_factors` then takes the 16-bit
branch of the smoothed weight and :func:`quantize_residual` quantizes what is left.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .formats import (
    Format,
    QTensor,
    engine_fake_quantize,
    fake_quantize,
    gram_factors,
    group_scales,
    quantize,
    quantize_with_scales,
    searched_scales,
)
from .gptq import gptq_quantize
from .lowrank import low_rank, refine_low_rank
from .settings import QuantSettings
from .smoothing import smooth_factors, weight_absmax

ACT_MODES = ("signed", "unsigned", "none")


def check_act_mode(mode: str, fmt: Format) -> None:
    if mode not in ACT_MODES:
        raise ValueError(f"unknown activation mode {mode!r} (allowed: {', '.join(ACT_MODES)})")
    if mode == "unsigned" and fmt.name != "int4":
        raise ValueError(f"unsigned activations exist for int4 only, not {fmt.name}")


def fake_quantize_activations(x: torch.Tensor, fmt: Format, mode: str, rule: str = "full",
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What the 4-bit GEMM sees of smoothed activations: dynamic per-token groups under ``rule`` (a layer's
    ``act_range``): float32 scales over the whole signed code range (``full``) or ``max|x|/7``
    (``symmetric``), or Nunchaku's kernels' rule (``nunchaku``, scales stored in ``dtype``; always signed)."""
    if mode == "none":
        return x.float()
    if rule == "nunchaku":
        return engine_fake_quantize(x, fmt, dtype)
    return fake_quantize(x, fmt, signed=mode == "signed", per_row_tensor_scale=True, full_range=rule == "full")


def scale_dtype_for(config: QuantSettings, model_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if config.scale_dtype == "float32" else model_dtype


@dataclass(frozen=True)
class SmoothingChoice:
    """The winning smoothing candidate: exponents, factors λ [K] (float32, storage-rounded), and the
    relative output error it scored on the search sample."""

    alpha: float
    beta: float
    smooth: torch.Tensor
    error: float


def branch_output(
    x: torch.Tensor,
    weight: torch.Tensor,
    smooth: torch.Tensor,
    shift: float,
    config: QuantSettings,
    act_mode: str,
    model_dtype: torch.dtype,
) -> torch.Tensor:
    """Output (no bias) of ``weight`` [N, K] quantized with λ = ``smooth``, for raw inputs ``x``.

    The search's fast stand-in for a stored layer: the same smoothing, branch, rounding of factors, fake
    quantization and shift-into-bias correction, with a randomized SVD whatever the layer's size.
    """
    fmt = config.format
    rounded = _rounder(model_dtype)
    smoothed_weight = weight * smooth
    down, up = low_rank(smoothed_weight, config.effective_rank, exact_max_elements=0, seed=config.seed)
    down, up = rounded(down), rounded(up)
    branch = up @ down
    residual_q = fake_quantize(smoothed_weight - branch, fmt, True, scale_dtype_for(config, model_dtype),
                               full_range=config.full_range)
    x_smooth = (x + shift) / smooth
    y = fake_quantize_activations(x_smooth, fmt, act_mode, config.activation_rule, model_dtype) @ residual_q.T
    if down.shape[0]:
        y = y + (x_smooth @ down.T) @ up.T
    if shift:
        y = y - shift * ((residual_q + branch) / smooth).sum(dim=1)
    return y


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖output − reference‖ / ‖reference‖`` (the Frobenius norms of whole batches)."""
    scale = torch.linalg.vector_norm(reference).clamp(min=1e-30)
    return (torch.linalg.vector_norm(output - reference) / scale).item()


def search_smoothing(
    weights: list[torch.Tensor],
    inputs: torch.Tensor,
    act_absmax: torch.Tensor,
    config: QuantSettings,
    act_mode: str,
    model_dtype: torch.dtype,
    shift: float = 0.0,
) -> SmoothingChoice:
    """Grid-search α/β for the layers in ``weights`` (they share the input, so they share λ).

    Every candidate λ is scored by each member's relative output error (its own low-rank branch and 4-bit
    rounding in the loop, as the real decomposition does), averaged over the members so that a layer with
    large outputs cannot win λ at the others' expense. For speed the error is measured on
    ``config.search_rows`` calibration rows and a seeded sample of ``config.search_channels`` output channels
    per member; the winner is later decomposed on the full weights.

    Args:
        weights: ``[N_i, K]`` weights reading the same input.
        inputs: raw calibration rows ``[M, K]``.
        act_absmax: per-channel ``max|x + shift|`` over all calibration tokens.
        config: quantization config (method, precision, grid, rank).
        act_mode: ``signed``, ``unsigned`` or ``none`` (weight-only).
        model_dtype: dtype λ and the branch are stored in.
        shift: constant added to inputs before smoothing (unsigned activations).
    """
    check_act_mode(act_mode, config.format)
    w_absmax = weight_absmax(weights)
    x = inputs[: config.search_rows].float()
    members = [_channel_sample(w.detach(), config.search_channels, config.seed + i) for i, w in enumerate(weights)]
    # A sample's rank cannot exceed its own size; the full decomposition uses the real rank.
    search_config = config
    smallest = min(min(m.shape) for m in members)
    if config.effective_rank > smallest:
        search_config = replace(config, rank=smallest // 16 * 16)
    references = [x @ m.T for m in members]
    scored: dict[tuple[float, float], SmoothingChoice] = {}

    def score(alpha: float, beta: float) -> SmoothingChoice:
        if (alpha, beta) not in scored:
            smooth = smooth_factors(act_absmax, w_absmax, alpha, beta, model_dtype)
            errors = [relative_error(branch_output(x, member, smooth, shift, search_config, act_mode, model_dtype),
                                     reference) for member, reference in zip(members, references, strict=True)]
            scored[(alpha, beta)] = SmoothingChoice(alpha, beta, smooth, sum(errors) / len(errors))
        return scored[(alpha, beta)]

    candidates = config.smoothing_candidates
    if config.search == "local" and config.smooths:
        candidates = _local_search(config.alphas, score)
    best: SmoothingChoice | None = None
    for alpha, beta in candidates:  # in a fixed order: ties go to the earlier candidate
        choice = score(alpha, beta)
        if best is None or choice.error < best.error:
            best = choice
    return best


def _local_search(alphas: tuple[float, ...], score) -> list[tuple[float, float]]:
    """The candidates a local search over the α grid visits, coarse to fine.

    The error falls smoothly to one minimum along α, and the two β families (0 and 1−α) track each other
    within a few percent (measured on the FLUX-shaped layers), so: "no smoothing" and every third α with
    β = 0; then the best α's neighbours at distance 2 and 1; then β = 1−α at the best α and its neighbours —
    about 13 of the 39 candidates, the same choice as the full grid on the synthetic FLUX-shaped layers.
    """
    def family(index: int, beta_of) -> tuple[float, float]:
        return (alphas[index], round(beta_of(alphas[index]), 6))

    zero, complement = (lambda a: 0.0), (lambda a: 1.0 - a)
    coarse = sorted({*range(0, len(alphas), 3), len(alphas) - 1})
    visited = [(0.0, 0.0)] + [family(i, zero) for i in coarse]
    best = min(coarse, key=lambda i: score(*family(i, zero)).error)
    for distance in (2, 1):
        around = [i for i in (best - distance, best + distance) if 0 <= i < len(alphas)]
        visited += [family(i, zero) for i in around]
        best = min([best, *around], key=lambda i: score(*family(i, zero)).error)
    visited += [family(i, complement) for i in (best - 1, best, best + 1) if 0 <= i < len(alphas)]
    return list(dict.fromkeys(visited))


def _channel_sample(weight: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` seeded output channels of ``weight`` (all when count is 0 or larger), as float32."""
    if count and weight.shape[0] > count:
        picked = torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
        weight = weight[picked.sort().values]
    return weight.float()


def branch_factors(
    weight: torch.Tensor, smooth: torch.Tensor, config: QuantSettings, model_dtype: torch.dtype,
    rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank branch ``(lora_down [r, K], lora_up [N, r])`` of the smoothed weight, in ``model_dtype``, of
    ``rank`` (default: the config's; 0 gives empty factors).

    With ``config.lowrank_iters > 1`` the factors are refined against the residual's quantization error.
    """
    fmt = config.format
    scale_dtype = scale_dtype_for(config, model_dtype)
    down, up = refine_low_rank(
        weight.detach().to(torch.float32, copy=True).mul_(smooth.float()),
        config.effective_rank if rank is None else rank,
        lambda residual: fake_quantize(residual, fmt, True, scale_dtype, full_range=config.full_range),
        config.lowrank_iters,
        config.exact_svd_max_elements,
        config.seed,
        _rounder(model_dtype),
    )
    return down.to(model_dtype), up.to(model_dtype)


def quantize_residual(
    weight: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    config: QuantSettings,
    model_dtype: torch.dtype,
    hessian: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> QTensor:
    """Quantize ``R = W·diag(λ) − lora_up·lora_down`` (round-to-nearest, or GPTQ with ``hessian``).

    ``gram [K/group, group, group]`` — the smoothed inputs' mean ``x̂ᵀx̂`` within each group — makes the scale
    search (``config.scale_search``) minimise the output error on the calibration rows (the weight error
    without it).
    """
    fmt = config.format
    scale_dtype = scale_dtype_for(config, model_dtype)
    if config.gptq or fmt.is_float:  # the whole residual: GPTQ's updates and NVFP4's tensor scale span its rows
        residual = _residual(weight, smooth, lora_down, lora_up)
        # Nunchaku's modules hold the tensor scale in the model dtype: make it one that dtype holds exactly
        stored = model_dtype if config.activation_rule == "nunchaku" else None
        if config.gptq:
            if hessian is None:
                raise ValueError("GPTQ needs the calibration Hessian")
            return gptq_quantize(residual, hessian, fmt, scale_dtype, config.gptq_block, config.gptq_damp,
                                 config.full_range, config.scale_search, stored)
        return quantize(residual, fmt, True, scale_dtype, full_range=config.full_range, tensor_scale_dtype=stored)
    # INT groups lie within a row: a few MB of rows at a time, never a float32 copy of the whole weight.
    factored = gram_factors(gram) if config.scale_search and gram is not None else None
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty((weight.shape[0], weight.shape[1] // fmt.group_size), dtype=scale_dtype,
                         device=weight.device)
    rows = max(1, RESIDUAL_CHUNK_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        residual = _residual(weight[part], smooth, lora_down, lora_up[part])
        if config.scale_search:
            scales[part] = searched_scales(residual, fmt, scale_dtype=scale_dtype, factored=factored)
        else:
            scales[part] = group_scales(residual, fmt, True, scale_dtype, full_range=config.full_range)
        codes[part] = quantize_with_scales(residual, scales[part], fmt)
    return QTensor(codes, scales, fmt)


RESIDUAL_CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 rows per step of quantize_residual


def _residual(weight: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, lora_up: torch.Tensor):
    """``W·diag(λ) − lora_up·lora_down`` in float32, computed in float64 and rounded once.

    A float32 GEMM rounds differently for different row counts (the library picks its kernel by shape), which
    would make the codes depend on how the rows were chunked. In float64 the products and sums of 16-bit
    factors are exact, so each element is the same whatever rows it was computed with.
    """
    residual = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    rows = max(1, RESIDUAL_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    smooth, lora_down = smooth.double(), lora_down.double()
    for start in range(0, weight.shape[0], rows):  # float64 temporaries of a few MB, not of the weight's size
        part = slice(start, start + rows)
        exact = weight[part].detach().double().mul_(smooth).addmm_(lora_up[part].double(), lora_down, alpha=-1)
        residual[part] = exact
    return residual


def _rounder(dtype: torch.dtype):
    return lambda t: t.to(dtype).float()
