import numpy as np
import pytest
import torch

from svdq_cli.quant.smoothing import smooth_factors, weight_absmax


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.5, 0.5), (0.8, 0.0), (0.3, 0.7)])
def test_factors_match_float64_formula(gen, alpha, beta):
    act = torch.rand(256, generator=gen) * 50
    weights = [torch.randn(96, 256, generator=gen), torch.randn(32, 256, generator=gen)]
    w_max = weight_absmax(weights)
    np.testing.assert_allclose(w_max.numpy(), np.abs(torch.cat(weights).numpy()).max(0))
    factors = smooth_factors(act, w_max, alpha, beta, torch.float32)
    expected = act.double().numpy() ** alpha / w_max.double().numpy() ** beta
    np.testing.assert_allclose(factors.numpy(), expected, rtol=1e-5)


def test_factors_are_rounded_to_storage_dtype_and_dead_channels_are_one(gen):
    act = torch.rand(64, generator=gen) * 10
    act[3] = 0.0
    factors = smooth_factors(act, torch.rand(64, generator=gen) + 0.1, 0.5, 0.5, torch.bfloat16)
    assert factors.dtype == torch.float32 and factors[3] == 1.0
    assert torch.equal(factors, factors.to(torch.bfloat16).float())


def test_smoothing_keeps_the_product_and_flattens_outliers(gen):
    x = torch.randn(128, 64, generator=gen)
    x[:, 5] *= 40
    w = torch.randn(32, 64, generator=gen)
    factors = smooth_factors(x.abs().amax(0), weight_absmax([w]), 0.5, 0.5)
    torch.testing.assert_close((x / factors) @ (w * factors).T, x @ w.T, rtol=1e-4, atol=1e-3)
    smoothed_max = (x / factors).abs().amax(0)
    assert smoothed_max.max() / smoothed_max.median() < x.abs().amax(0).max() / x.abs().amax(0).median() / 4


def test_mismatched_statistics_are_rejected():
    with pytest.raises(ValueError, match="do not match"):
        smooth_factors(torch.ones(4), torch.ones(5), 0.5, 0.5)
