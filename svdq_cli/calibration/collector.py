"""Calibration statistics of a whole model: forward pre-hooks on its target linears feed one
:class:`~svdq_cli.quant.statistics.InputStats` per distinct input while ``calibrate`` runs its forward passes;
under torchrun the ranks split the prompts and merge their sums exactly (DESIGN.md §4)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BadInputError
from ..methods.config import QuantConfig
from ..quant.statistics import InputStats
from ..system.distributed import World


class _Collector:
    """Forward pre-hooks that feed :class:`InputStats`, one per distinct input.

    Layers called back to back on the *same tensor object* (q/k/v on one hidden state) share an input:
    the later ones alias the first one's statistics instead of recording the same rows again. Callers can
    name the groups instead, which turns that detection off.
    """

    def __init__(self, layers: dict[str, nn.Linear], config: QuantConfig, groups: Sequence[Sequence[str]]):
        self.layers = layers
        self.config = config
        self.stats: dict[str, InputStats] = {}
        self.owner: dict[str, str] = {}
        self.called: set[str] = set()
        self.inconsistent: set[str] = set()
        self._detect = not groups
        self._fixed = set()
        for group in groups:
            unknown = [name for name in group if name not in layers]
            if unknown:
                raise BadInputError(f"group member(s) {', '.join(unknown)} are not target linear layers")
            for name in group:
                self.owner[name] = group[0]
                self._fixed.add(name)
        self._last: tuple[str, torch.Tensor] | None = None
        self.unit: int | None = None

    def _stats_for(self, name: str) -> InputStats:
        if name not in self.stats:
            self.stats[name] = InputStats(
                self.layers[name].in_features,
                self.config.calib_rows,
                self.config.seed * 1_000_003 + zlib.crc32(name.encode()),  # by name: whatever the layer order
                hessian=self.config.gptq,
            )
            if self.unit is not None:
                self.stats[name].start_unit(self.unit)
        return self.stats[name]

    def start_unit(self, unit: int) -> None:
        """Record the next inputs as calibration unit ``unit`` (see :meth:`InputStats.start_unit`)."""
        self.unit = unit
        for stats in self.stats.values():
            stats.start_unit(unit)

    def observe(self, name: str, x: torch.Tensor) -> None:
        first_call = name not in self.called
        self.called.add(name)
        shares_last = self._last is not None and self._last[1] is x and self._last[0] != name
        if first_call and self._detect and shares_last:
            self.owner[name] = self.owner.get(self._last[0], self._last[0])
        owner = self.owner.setdefault(name, name)
        if owner != name:
            if self._detect and not shares_last:
                self.inconsistent.add(name)
        else:
            self._stats_for(name).update(x)
        self._last = (name, x)

    def hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        return [
            module.register_forward_pre_hook(lambda _m, args, name=name: self.observe(name, args[0]))
            for name, module in self.layers.items()
        ]

    def release(self) -> None:
        self._last = None


@dataclass
class Calibration:
    """Statistics of every distinct input (keyed by the first layer reading it) and the layers reading it."""

    stats: dict[str, InputStats]
    members: dict[str, list[str]]


def collect_statistics(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    calibrate: Callable[..., object],
    config: QuantConfig,
    groups: Sequence[Sequence[str]] = (),
    units: int | None = None,
    world: World | None = None,
) -> Calibration:
    """Run calibration with hooks on ``layers`` and return their input statistics.

    Without ``units``, ``calibrate(model)`` runs once. With ``units``, calibration is that many units (one
    prompt each), ``calibrate(model, unit)`` for each; in a ``world`` of several processes each runs its share
    (unit i on rank i mod N) and after each round the ranks exchange the round's statistics. Every rank then
    returns the statistics one process running every unit returns, bit for bit.

    Raises:
        BadInputError: a layer never called, a group that shares its input only sometimes, NaN/Inf inputs,
            fewer units than processes.
    """
    world = world or World()
    if units is not None and units < world.size:
        raise BadInputError(f"{units} calibration prompt(s) for {world.size} ranks: every rank needs at least one "
                            "(raise --num-prompts or start fewer processes)")
    collector = _Collector(layers, config, groups)
    handles = collector.hooks()
    try:
        with torch.no_grad():
            if units is None:
                collector.start_unit(0)
                calibrate(model)
                _merge_round(collector, World(), 1)
            for number, round_ in enumerate(world.rounds(units or 0)):
                mine = round_.start + world.rank
                collector.start_unit(mine)
                if mine in round_:
                    calibrate(model, mine)
                if number == 0:  # every rank must merge the same inputs in the same order
                    world.check_same(list(collector.stats), "calibrated inputs")
                _merge_round(collector, world, len(round_))
            if world.size > 1:
                _merge_samples(collector, world)
    finally:
        for handle in handles:
            handle.remove()
        collector.release()
    _check_calibration(collector)
    members: dict[str, list[str]] = {}
    for name in layers:
        members.setdefault(collector.owner[name], []).append(name)
    return Calibration(collector.stats, members)


SUMS, SAMPLES = "the exchange of calibration sums", "the exchange of calibration samples"  # World.sent's keys


def _merge_round(collector: _Collector, world: World, units: int) -> None:
    """Add one round's sums (one unit per rank, ``units`` of them) to the totals, in unit order, on every rank."""
    for stats in collector.stats.values():
        for sums in world.exchange(stats.finish_unit(), SUMS)[:units]:
            stats.add_sums(sums)


def _merge_samples(collector: _Collector, world: World) -> None:
    """Give every rank every rank's extremes, counts and row samples (order-free merges: once, at the end)."""
    for stats in collector.stats.values():
        for rank, state in enumerate(world.exchange(stats.sample_state(), SAMPLES)):
            if rank != world.rank:
                stats.merge_sample(state)


def _check_calibration(collector: _Collector) -> None:
    never = [name for name in collector.layers if name not in collector.called]
    if never:
        raise BadInputError(f"layer {never[0]}: never called during calibration ({len(never)} layer(s) in all)")
    if collector.inconsistent:
        name = sorted(collector.inconsistent)[0]
        raise BadInputError(f"layer {name}: shares its input only sometimes; pass its group explicitly (groups=...)")
    for name, stats in collector.stats.items():
        if not stats.finite:
            raise BadInputError(f"layer {name}: calibration activations hold NaN or Inf")
