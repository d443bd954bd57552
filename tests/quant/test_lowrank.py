import numpy as np
import pytest
import torch

from svdq_cli.quant.formats import FORMATS, fake_quantize
from svdq_cli.quant.lowrank import low_rank, refine_low_rank


def decaying(gen, n, k, rank_scale=8):
    """A matrix with a decaying spectrum plus noise, like a smoothed weight with migrated outliers."""
    u = torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(k, k, generator=gen))[0]
    m = min(n, k)
    s = torch.exp(-torch.arange(m, dtype=torch.float32) / rank_scale) * 10 + 0.01
    return (u[:, :m] * s) @ v[:, :m].T


def optimal_error(w: torch.Tensor, rank: int) -> float:
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    return float(np.sqrt((s[rank:] ** 2).sum()))


@pytest.mark.parametrize("exact", [True, False])
def test_low_rank_reaches_the_eckart_young_optimum(gen, exact):
    w = decaying(gen, 192, 256)
    down, up = low_rank(w, 32, exact_max_elements=1 << 30 if exact else 0, seed=1)
    assert down.shape == (32, 256) and up.shape == (192, 32)
    error = torch.linalg.matrix_norm((w - up @ down).double()).item()
    best = optimal_error(w, 32)
    assert error <= best * (1 + 1e-6 if exact else 1.01)


def test_randomized_svd_is_deterministic_for_a_seed(gen):
    w = decaying(gen, 300, 200)
    a = low_rank(w, 16, exact_max_elements=0, seed=7)
    b = low_rank(w, 16, exact_max_elements=0, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_rank_zero_and_bad_rank(gen):
    w = torch.randn(32, 64, generator=gen)
    down, up = low_rank(w, 0, 1 << 20)
    assert down.shape == (0, 64) and up.shape == (32, 0)
    with pytest.raises(ValueError, match="exceeds"):
        low_rank(w, 48, 1 << 20)


def test_refinement_never_worsens_the_quantized_reconstruction(gen):
    w = decaying(gen, 128, 256) + torch.randn(128, 256, generator=gen) * 0.3
    q = lambda r: fake_quantize(r, FORMATS["int4"])  # noqa: E731

    def error(factors):
        residual = w - factors[1] @ factors[0]
        return torch.linalg.matrix_norm(residual - q(residual)).item()

    plain = refine_low_rank(w, 16, q, 1, 1 << 30)
    refined = refine_low_rank(w, 16, q, 5, 1 << 30)
    assert error(refined) <= error(plain)
