"""The distributed collect's arithmetic, in one process: ranks are threads whose exchanges meet at a barrier, so
the merge logic of :func:`collect_statistics` runs exactly as under torchrun, without a process group."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from svdq_cli.calibration.collector import collect_statistics
from svdq_cli.errors import BadInputError
from svdq_cli.methods.config import QuantConfig
from svdq_cli.quant.statistics import InputStats
from svdq_cli.system.distributed import World


class ThreadWorld(World):
    """Rank ``rank`` of ``size`` threads; :meth:`exchange` is an all-gather through shared slots."""

    def __init__(self, rank: int, size: int, slots: list, barrier: threading.Barrier) -> None:
        super().__init__(rank, size)
        self.slots, self.gate = slots, barrier

    def exchange(self, value, what="an exchange"):
        self.slots[self.rank] = value
        self.gate.wait()
        gathered = list(self.slots)
        self.gate.wait()  # nobody overwrites a slot before every rank has read it
        return gathered


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As the CLI runs: torch's thread count is process-wide, and results move with it (threads.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 48))


def _calibrate(seed: int):
    def calibrate(model: nn.Module, unit: int) -> None:
        generator = torch.Generator().manual_seed(seed * 1000 + unit)
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):  # units differ in batches and rows
            rows = int(torch.randint(5, 70, (1,), generator=generator))
            x = torch.randn(rows, 128, generator=generator) * (1 + unit)
            negative = torch.rand(rows, generator=generator) < (1.0 if unit == 0 else 0.5)
            x[:, 3] = torch.where(negative, -0.0, 0.0)  # signed zeros: their min/max depends on order
            model(x)
    return calibrate


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _collect(seed, config, units, size):
    """Every rank's statistics (one process: a dict; ``size`` ranks: a list, each with its own model copy)."""
    if size == 1:
        model = _model(seed)
        return collect_statistics(model, _linears(model), _calibrate(seed), config, units=units).stats
    slots, barrier, results, errors = [None] * size, threading.Barrier(size), [None] * size, []
    models = [_model(seed) for _ in range(size)]  # hooks are per model: a shared one would record every rank

    def rank(r: int) -> None:
        try:
            results[r] = collect_statistics(models[r], _linears(models[r]), _calibrate(seed), config, units=units,
                                            world=ThreadWorld(r, size, slots, barrier)).stats
        except Exception as error:  # surfaced below, with the barrier broken so no thread waits forever
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bit pattern (-0.0 and +0.0 differ; torch.equal calls them equal)."""
    integer = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[tensor.element_size()]
    return tensor.contiguous().view(integer)


@pytest.mark.parametrize("size", [2, 3])
def test_every_rank_gets_the_bits_one_process_gets(gen, size):
    """Units spread over ranks in rounds (the last one short), merged by exchange: every rank's statistics —
    extremes, counts, row sample and its order, Gram blocks, row sums, GPTQ's float64 Hessian — equal one
    process's bit for bit."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    config = QuantConfig(calib_rows=48, gptq=True, seed=seed % 1000)
    units = 2 * size + 1
    single = _collect(seed, config, units, 1)
    for ranked in _collect(seed, config, units, size):
        assert list(ranked) == list(single)
        for name in single:
            expected, got = single[name].state(), ranked[name].state()
            assert list(got) == list(expected)
            for key in expected:
                assert got[key].dtype == expected[key].dtype
                assert torch.equal(_bits(got[key]), _bits(expected[key])), (name, key)


def test_merged_units_match_float64_sums_over_every_row(gen):
    """The totals, against float64 over every row of every unit: count, extremes, Σ xᵀx (GPTQ) and the Gram
    blocks; each sampled row is one of the inputs, at most once."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    model, seen = _model(seed), []
    model[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].double()))
    stats = collect_statistics(model, _linears(model), _calibrate(seed), QuantConfig(calib_rows=32, gptq=True),
                               units=5).stats["0"]
    everything = torch.cat(seen)
    assert stats.count == len(everything)
    np.testing.assert_array_equal(stats.channel_max.numpy(), everything.amax(0).float().numpy())
    expected = everything.T @ everything
    np.testing.assert_allclose(stats.xtx.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    blocks = everything.reshape(len(everything), 2, 64).transpose(0, 1)
    gram = torch.bmm(blocks.transpose(1, 2), blocks)
    np.testing.assert_allclose(stats.block_gram.double().numpy(), gram.numpy(), rtol=1e-4,
                               atol=1e-5 * gram.abs().max().item())
    assert stats.rows.shape == (32, 128)
    matches = (stats.rows.double()[:, None, :] == everything[None]).all(-1).sum(1)
    assert (matches == 1).all()


def test_fewer_units_than_ranks_is_refused():
    with pytest.raises(BadInputError, match="every rank needs at least one"):
        _collect(0, QuantConfig(calib_rows=8), 1, 2)


def test_rounds_and_ownership():
    world = World(rank=1, size=3)
    assert [list(r) for r in world.rounds(7)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [i for i in range(7) if world.owns(i)] == [1, 4]
    assert World().rounds(2) == [range(0, 1), range(1, 2)]
    assert World(0, 2, local_rank=1).device("cuda") == "cuda:1" and World().device("cuda") == "cuda"


def test_extremes_hold_no_negative_zero():
    """min/max keep whichever of -0.0 and +0.0 came first, so extremes are stored as +0.0 whatever the order."""
    stats = InputStats(4, max_rows=4, seed=0)
    stats.update(torch.tensor([[-0.0, 1.0, -0.0, 2.0], [-0.0, 3.0, -0.0, 4.0]]))
    stats.update(torch.tensor([[0.0, 1.0, -0.0, 2.0]]))
    zero = _bits(torch.tensor(0.0))
    for extreme in (stats.channel_min, stats.channel_max):
        assert torch.equal(_bits(extreme[[0, 2]]), zero.expand(2))
