"""The uniform engine: SVDQuant and its baselines (smoothquant, rtn) on one layer group at a time.

A group is the layers that read one input (q/k/v): its activation mode and smoothing are planned once
(:func:`plan_group`), then each layer is decomposed and rounded (:func:`quantize_layer`) and measured
against the 16-bit layer and naive RTN (:func:`measure_layer`). The stages call these per block; the API
calls :func:`quantize_layers` on a whole module.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BadInputError
from ..methods.baselines import naive_config
from ..methods.config import QuantConfig
from ..quant.statistics import InputStats
from ..quant.svdquant import relative_error, search_smoothing
from ..runtime.layers import replace_module
from ..runtime.linear import SVDQLinear
from ..system.threads import parallel_map
from .reports import LayerReport, Progress, QuantReport


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class GroupPlan:
    """How a group of layers sharing an input is quantized: activation mode, shift, smoothing."""

    act: str
    shift: float
    alpha: float
    beta: float
    smooth: torch.Tensor | None  # None: no smoothing
    seconds: float = 0.0


def plan_group(
    names: Sequence[str],
    modules: Sequence[nn.Linear],
    stats: InputStats,
    config: QuantConfig,
    weight_only: Sequence[str] = (),
    nonnegative: Sequence[str] = (),
) -> GroupPlan:
    """Pick the activation mode (signed, unsigned with a shift, or none) and search λ for one group."""
    start = time.perf_counter()
    dtype = modules[0].weight.dtype
    act = "none" if config.weight_only or matches(names[0], weight_only) else "signed"
    shift = 0.0
    if act == "signed" and config.precision == "int4" and config.act_range == "svdq" and matches(names[0], nonnegative):
        act, shift = "unsigned", max(0.0, -stats.minimum)
    if not config.smooths or config.plain_weight_only(act):
        return GroupPlan(act, shift, 0.0, 0.0, None, time.perf_counter() - start)
    raw = stats.sample(config.search_rows)
    choice = search_smoothing([m.weight for m in modules], raw, stats.absmax(shift), config, act, dtype, shift)
    return GroupPlan(act, shift, choice.alpha, choice.beta, choice.smooth, time.perf_counter() - start)


def group_hessian(stats: InputStats, plan: GroupPlan, in_features: int, config: QuantConfig) -> torch.Tensor | None:
    """GPTQ's ``Σ x̂ᵀx̂`` for the group's smoothed (and shifted) input, or None without GPTQ."""
    if not config.gptq:
        return None
    smooth = plan.smooth if plan.smooth is not None else torch.ones(in_features)
    return stats.hessian(smooth, plan.shift)


def input_gram(stats: InputStats, plan: GroupPlan, config: QuantConfig) -> torch.Tensor | None:
    """The group's smoothed (and shifted) inputs' mean ``x̂ᵀx̂`` within each group of the format,
    ``[K/group, group, group]``, over every calibration token: what a weight error costs at the output, for
    the weight-scale search. None when the search is off."""
    if not config.scale_search:
        return None
    return stats.group_gram(config.group_size, plan.smooth, plan.shift)


def quantize_layer(
    module: nn.Linear,
    config: QuantConfig,
    plan: GroupPlan,
    hessian: torch.Tensor | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    gram: torch.Tensor | None = None,
) -> SVDQLinear:
    """Quantize one layer of a planned group; ``factors`` reuses an already computed low-rank branch,
    ``gram`` (:func:`input_gram`) makes the weight-scale search minimise output error."""
    return SVDQLinear.from_linear(module, config, smooth=plan.smooth, act=plan.act, shift=plan.shift,
                                  hessian=hessian, factors=factors, gram=gram)


MEASURE_CHANNELS = 512  # output channels a layer's report is measured on (all when it has fewer)


def measure_layer(
    name: str,
    group: str,
    module: nn.Linear,
    quantized: SVDQLinear,
    plan: GroupPlan,
    rows: torch.Tensor,
    config: QuantConfig,
    seconds: float,
) -> LayerReport:
    """Output error of ``quantized`` (and of naive RTN at the same precision) against ``module`` on ``rows``.

    Measured on at most :data:`MEASURE_CHANNELS` seeded output channels: an output channel's error does not
    depend on the others, so a sample estimates the layer's relative error without the full products (most of
    the weight side's time at FLUX size otherwise). The naive layer quantizes those channels only (for NVFP4
    with their own tensor scale).
    """
    channels = None
    if module.out_features > MEASURE_CHANNELS:
        generator = torch.Generator().manual_seed(config.seed)
        channels = torch.randperm(module.out_features, generator=generator)[:MEASURE_CHANNELS].sort().values
    weight = module.weight if channels is None else module.weight[channels]
    bias = module.bias if channels is None or module.bias is None else module.bias[channels]
    sampled = nn.Linear(module.in_features, weight.shape[0], bias=bias is not None, device="meta")
    sampled.weight, sampled.bias = nn.Parameter(weight.detach()), None if bias is None else nn.Parameter(bias.detach())
    naive = SVDQLinear.from_linear(sampled, naive_config(config), act="none" if plan.act == "none" else "signed")
    x = rows.to(module.weight.device, module.weight.dtype)
    with torch.no_grad():
        reference = nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
        after, before = quantized.reference_forward(x, channels).float(), naive(x).float()
    return LayerReport(
        name=name,
        group=group,
        act=plan.act,
        alpha=plan.alpha,
        beta=plan.beta,
        shift=plan.shift,
        rank=quantized.rank,
        mse_before=torch.mean((before - reference) ** 2).item(),
        mse_after=torch.mean((after - reference) ** 2).item(),
        relative_error_before=relative_error(before, reference),
        relative_error_after=relative_error(after, reference),
        bytes_before=sum(p.numel() * p.element_size() for p in module.parameters()),
        bytes_after=quantized.nbytes(),
        seconds=seconds,
    )


def quantize_layers(model: nn.Module, layers: dict[str, nn.Linear], calibration, config: QuantConfig,
                    report: QuantReport, progress: Progress | None, weight_only: Sequence[str] = (),
                    nonnegative: Sequence[str] = ()) -> None:
    """Quantize every group of ``calibration`` (a :class:`~svdq_cli.calibration.collector.Calibration`) and put
    each layer's SVDQLinear in ``model``, its report in ``report``."""

    def quantize_group(owner: str) -> list[tuple[str, SVDQLinear, LayerReport]]:
        names, stats = calibration.members[owner], calibration.stats[owner]
        try:
            modules = [layers[name] for name in names]
            plan = plan_group(names, modules, stats, config, weight_only, nonnegative)
            done = []
            for name, module in zip(names, modules, strict=True):
                begin = time.perf_counter()
                hessian = group_hessian(stats, plan, module.in_features, config)
                quantized = quantize_layer(module, config, plan, hessian, gram=input_gram(stats, plan, config))
                seconds = time.perf_counter() - begin + plan.seconds / len(names)
                done.append((name, quantized, measure_layer(name, owner, module, quantized, plan,
                                                            stats.sample(config.search_rows), config, seconds)))
            return done
        except ValueError as error:
            raise BadInputError(f"layer {names[0]}: {error}") from None

    # Groups on every core, each single-threaded: the numerics do not depend on the thread count.
    for results in parallel_map(quantize_group, list(calibration.members)):
        for name, quantized, layer_report in results:
            replace_module(model, name, quantized)
            report.layers.append(layer_report)
            if progress:
                progress(name, len(report.layers), len(layers))
