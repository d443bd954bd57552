import numpy as np
import pytest
import torch

from svdq_cli.quant.formats import FORMATS, quantize
from svdq_cli.quant.gptq import gptq_quantize


def gptq_reference(w: np.ndarray, h: np.ndarray, group: int, qmax: int, damp: float, full_range: bool):
    """Unblocked float64 GPTQ straight from the paper: quantize column j, then push its error onto the
    later columns with row j of the upper Cholesky factor of H⁻¹. Scales are fixed per group on entry.
    Returns codes, scales and the near-tie mask."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64) + np.eye(len(h)) * damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor: H⁻¹ = Uᵀ U
    n, k = w.shape
    codes = np.zeros((n, k))
    scales = np.zeros((n, k // group))
    ties = np.zeros((n, k), dtype=bool)
    for j in range(k):
        if j % group == 0:
            block = w[:, j : j + group]
            if full_range:  # the most negative value may reach -(qmax+1)
                scales[:, j // group] = np.maximum(np.clip(block.max(1), 0, None) / qmax,
                                                   np.clip(-block.min(1), 0, None) / (qmax + 1))
            else:
                scales[:, j // group] = np.abs(block).max(1) / qmax
        s = scales[:, j // group]
        ratio = np.where(s > 0, w[:, j] / np.where(s > 0, s, 1), 0)
        ties[:, j] = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-6
        codes[:, j] = np.clip(np.rint(ratio), -qmax - 1, qmax)
        error = (w[:, j] - codes[:, j] * s) / u[j, j]
        w[:, j:] -= np.outer(error, u[j, j:])
    return codes, scales, ties


@pytest.mark.parametrize("full_range", [True, False])
def test_blocked_gptq_matches_unblocked_float64_reference(gen, full_range):
    n, k = 24, 256
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(512, k, generator=gen) * (1 + 5 * torch.rand(k, generator=gen))
    h = x.T @ x
    q = gptq_quantize(w, h, FORMATS["int4"], torch.float32, block_size=128, damp=0.01, full_range=full_range)
    codes, scales, ties = gptq_reference(w.numpy(), h.double().numpy(), 64, 7, 0.01, full_range)
    np.testing.assert_allclose(q.scales.double().numpy(), scales, rtol=1e-5)
    # A near-tie rounded differently changes every later column of that row, so compare up to the first one.
    for row in range(n):
        first_tie = int(np.argmax(ties[row])) if ties[row].any() else k
        assert np.array_equal(q.codes[row, :first_tie].numpy(), codes[row, :first_tie])


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_gptq_beats_round_to_nearest_on_the_output(gen, precision):
    fmt = FORMATS[precision]
    w = torch.randn(64, 256, generator=gen)
    x = torch.randn(1024, 256, generator=gen) @ torch.randn(256, 256, generator=gen) * 0.2  # correlated inputs
    q_gptq = gptq_quantize(w, x.T @ x, fmt)
    q_rtn = quantize(w, fmt)

    def output_error(q):
        return torch.linalg.matrix_norm(x @ (q.dequantize() - w).T).item()

    assert output_error(q_gptq) < output_error(q_rtn)
    assert q_gptq.scales.dtype == q_rtn.scales.dtype and q_gptq.codes.shape == w.shape


def test_gptq_bad_input(gen):
    w = torch.randn(8, 128, generator=gen)
    with pytest.raises(ValueError, match="Hessian has shape"):
        gptq_quantize(w, torch.eye(64), FORMATS["int4"])
    with pytest.raises(ValueError, match="multiple of the group size"):
        gptq_quantize(w, torch.eye(128), FORMATS["int4"], block_size=96)
