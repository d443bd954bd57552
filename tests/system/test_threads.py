"""parallel_map: the weight side on every core, with the results of a serial loop."""

import pytest
import torch

from svdq_cli.quant.lowrank import low_rank
from svdq_cli.system.threads import parallel_map, workers


def test_results_are_the_serial_ones_in_order_whatever_the_worker_count(gen, monkeypatch):
    weights = [torch.randn(200 + 8 * i, 150, generator=gen) for i in range(6)]
    decompose = lambda w: low_rank(w, 16, exact_max_elements=0, seed=3)  # noqa: E731 (randomized SVD, own RNG)
    monkeypatch.setenv("SVDQ_WORKERS", "1")
    serial = list(parallel_map(decompose, weights))
    monkeypatch.setenv("SVDQ_WORKERS", "3")
    assert workers() == 3
    parallel = list(parallel_map(decompose, weights))
    for (down, up), (down_p, up_p), weight in zip(serial, parallel, weights, strict=True):
        assert torch.equal(down, down_p) and torch.equal(up, up_p)
        assert up.shape == (weight.shape[0], 16)


def test_an_error_in_a_worker_reaches_the_caller(monkeypatch):
    monkeypatch.setenv("SVDQ_WORKERS", "2")

    def fails_on_three(value: int) -> int:
        if value == 3:
            raise ValueError("three")
        return value

    with pytest.raises(ValueError, match="three"):
        list(parallel_map(fails_on_three, range(6)))


def test_torch_runs_single_threaded_inside_and_is_restored_after(monkeypatch):
    monkeypatch.setenv("SVDQ_WORKERS", "2")
    before = torch.get_num_threads()
    assert list(parallel_map(lambda _: torch.get_num_threads(), range(4))) == [1, 1, 1, 1]
    assert torch.get_num_threads() == before
