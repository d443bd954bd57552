import numpy as np
import pytest
import torch

from svdq_cli.quant.statistics import InputStats


def test_statistics_cover_every_token_and_the_sample_stays_bounded(gen):
    stats = InputStats(32, max_rows=100, seed=3, hessian=True)
    batches = [torch.randn(int(n), 32, generator=gen) for n in torch.randint(10, 90, (12,), generator=gen)]
    batches[4][7, 9] = 123.0
    for b in batches:
        stats.update(b.reshape(1, -1, 32))
    everything = torch.cat(batches).double()
    assert stats.count == len(everything)
    np.testing.assert_allclose(stats.absmax().numpy(), everything.abs().amax(0).numpy(), rtol=1e-6)
    assert stats.absmax()[9] == 123.0
    assert stats.rows.shape[0] == min(100, len(everything))
    # Every sampled row is one of the inputs, each at most once.
    matches = (stats.rows.double()[:, None, :] == everything[None]).all(-1).sum(1)
    assert (matches >= 1).all()
    smooth = torch.rand(32, generator=gen) + 0.5
    shift = 0.25
    expected = ((everything + shift) / smooth.double()).T @ ((everything + shift) / smooth.double())
    # Σ xᵀx accumulates in float32: its error is absolute, a few ulps of the largest entries.
    np.testing.assert_allclose(
        stats.hessian(smooth, shift).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5 * expected.abs().max().item()
    )
    np.testing.assert_allclose(stats.absmax(shift).numpy(), (everything + shift).abs().amax(0).numpy(), rtol=1e-6)


def test_sample_is_reproducible_and_roughly_uniform():
    def run(seed):
        stats = InputStats(1, max_rows=200, seed=seed)
        for start in range(0, 2000, 100):
            stats.update(torch.arange(start, start + 100, dtype=torch.float32)[:, None])
        return stats.rows[:, 0]

    assert torch.equal(run(5), run(5))
    sample = run(11)
    # A uniform 10% sample of 0..1999: each tenth of the range holds about 20 rows.
    counts = torch.histc(sample, bins=10, min=0, max=2000)
    assert counts.min() >= 5 and counts.max() <= 40


def test_non_finite_inputs_are_flagged_not_recorded():
    stats = InputStats(4, 10, 0)
    stats.update(torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))
    assert not stats.finite and stats.count == 0
    with pytest.raises(ValueError, match="no calibration"):
        stats.absmax()


@pytest.mark.parametrize(("in_features", "group"), [(128, 64), (128, 16), (48, 16)])
def test_group_gram_is_the_smoothed_shifted_inputs_mean_gram_within_each_group(gen, in_features, group):
    """Against float64 from every token (the row sample holds only a few): blocks of 64 hold groups of 16 on
    their diagonal, and K=48 falls back to blocks of 16."""
    stats = InputStats(in_features, max_rows=8, seed=1)
    sizes = torch.randint(5, 60, (6,), generator=gen)
    batches = [torch.randn(int(n), in_features, generator=gen) * 3 + 1 for n in sizes]
    for batch in batches:
        stats.update(batch)
    everything = torch.cat(batches).double()
    smooth, shift = torch.rand(in_features, generator=gen) + 0.5, 0.7
    smoothed = ((everything + shift) / smooth.double()).reshape(len(everything), -1, group).transpose(0, 1)
    expected = torch.bmm(smoothed.transpose(1, 2), smoothed) / len(everything)
    gram = stats.group_gram(group, smooth, shift)
    assert gram.shape == (in_features // group, group, group)
    np.testing.assert_allclose(gram.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    restored = InputStats.from_state(stats.state())
    assert torch.equal(restored.group_gram(group, smooth, shift), gram)
    with pytest.raises(ValueError, match="do not tile"):
        stats.group_gram(128, smooth)  # wider than any block
