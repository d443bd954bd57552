"""Low-rank branch: the top-r SVD of the smoothed weight (DESIGN.md §1 step 2)."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Extra columns for the randomized range finder, and its power iterations (Halko et al. defaults).
OVERSAMPLE = 16
POWER_ITERATIONS = 2


def top_singular(
    weight: torch.Tensor, rank: int, exact_max_elements: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``weight`` [N, K] as float32 (U [N,r], S [r], Vh [r,K]).

    Exact float64 SVD when ``N·K <= exact_max_elements``; above it a randomized SVD drawing from its own
    seeded generator, so the same weight always gives the same factors (resumed runs stay byte-identical)
    and layers can be decomposed on several threads at once.
    """
    n, k = weight.shape
    if rank > min(n, k):
        raise ValueError(f"rank {rank} exceeds min(out_features, in_features) = {min(n, k)}")
    if weight.numel() <= exact_max_elements or rank + OVERSAMPLE > min(n, k) // 2:
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        return u[:, :rank].float(), s[:rank].float(), vh[:rank].float()
    u, s, vh = randomized_svd(weight.float(), rank + OVERSAMPLE, POWER_ITERATIONS, seed)
    return u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous()


def randomized_svd(matrix: torch.Tensor, columns: int, power_iterations: int, seed: int):
    """Halko, Martinsson & Tropp's randomized SVD (range finder with re-orthonormalized power iterations,
    their Algorithms 4.4 and 5.1): ``U [N, q], S [q], Vh [q, K]`` approximating the top ``q`` triplets."""
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    probe = torch.randn(matrix.shape[1], columns, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u, s, vh


def low_rank(
    weight: torch.Tensor, rank: int, exact_max_elements: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(down [r, K], up [N, r])`` with ``up @ down`` the best rank-r approximation.

    The singular values are split evenly (√S on each side) so neither factor has a large dynamic range
    when stored in 16 bits.
    """
    n, k = weight.shape
    if rank == 0:
        return weight.new_zeros((0, k), dtype=torch.float32), weight.new_zeros((n, 0), dtype=torch.float32)
    u, s, vh = top_singular(weight, rank, exact_max_elements, seed)
    root = s.clamp(min=0).sqrt()
    return root[:, None] * vh, u * root[None, :]


def refine_low_rank(
    weight: torch.Tensor,
    rank: int,
    fake_quantize_residual: Callable[[torch.Tensor], torch.Tensor],
    iterations: int,
    exact_max_elements: int,
    seed: int = 0,
    round_factors: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors refined against the residual's quantization error.

    Iterates ``L ← SVD_r(Ŵ − Q(Ŵ − L))`` so the branch also absorbs what 4-bit rounding of the residual
    loses, keeping the best ``‖Ŵ − L − Q(Ŵ − L)‖`` seen and stopping once an iteration gains < 0.1%.
    ``iterations = 1`` is the plain SVD. ``round_factors`` rounds factors to their storage dtype so the
    error measured is the one the stored layer will have.
    """
    down, up = low_rank(weight, rank, exact_max_elements, seed)
    down, up = round_factors(down), round_factors(up)
    if rank == 0 or iterations <= 1:
        return down, up

    def error(d: torch.Tensor, u: torch.Tensor) -> float:
        residual = weight - u @ d
        return torch.linalg.vector_norm(residual - fake_quantize_residual(residual)).item()

    best, best_error = (down, up), error(down, up)
    for _ in range(iterations - 1):
        branch = up @ down
        target = weight - fake_quantize_residual(weight - branch)
        down, up = low_rank(target, rank, exact_max_elements, seed)
        down, up = round_factors(down), round_factors(up)
        current = error(down, up)
        if current >= best_error * 0.999:
            if current < best_error:
                best, best_error = (down, up), current
            break
        best, best_error = (down, up), current
    return best
