"""Public Python API: quantize the linear layers of any torch module in place (DESIGN.md §3).

The CLI's stages and the benchmarks go through the same functions, so comparisons are like for like.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .distributed import World
from .errors import BadInputError
from .quant.calibration import InputStats
from .quant.config import QuantConfig
from .quant.svdquant import relative_error, search_smoothing
from .runtime.linear import SVDQLinear
from .threads import parallel_map

Progress = Callable[[str, int, int], None]


@dataclass
class LayerReport:
    """What happened to one layer. Errors are measured on calibration rows against the 16-bit layer."""

    name: str
    group: str
    act: str
    alpha: float
    beta: float
    shift: float
    rank: int
    mse_before: float  # naive quantization: RTN weights (and activations), no smoothing, no branch
    mse_after: float
    relative_error_before: float
    relative_error_after: float
    bytes_before: int
    bytes_after: int
    seconds: float


@dataclass
class QuantReport:
    """Per-layer results of :func:`quantize_model`, plus the layers left in 16 bits and why."""

    config: QuantConfig
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def to_dict(self) -> dict[str, object]:
        return {
            "config": self.config.to_dict(),
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": dict(self.skipped),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select_targets(
    model: nn.Module, config: QuantConfig, targets: Sequence[str] | None, skip: Sequence[str]
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """The linear layers to quantize (name → module) and the skipped ones (name → reason).

    Default targets are every ``nn.Linear`` whose ``in_features`` the group size divides; explicit targets
    (names or glob patterns) that cannot be quantized are errors rather than silent skips.
    """
    chosen: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    matched_patterns: set[str] = set()
    linear_names = [name for name, module in model.named_modules()
                    if isinstance(module, nn.Linear) and not isinstance(module, SVDQLinear)]
    unmatched = [pattern for pattern in skip if not any(fnmatch.fnmatchcase(name, pattern) for name in linear_names)]
    if unmatched:  # a typo would otherwise quantize the layer the user meant to keep
        raise BadInputError(f"skip pattern(s) {', '.join(map(repr, unmatched))} match no nn.Linear of the model")
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, SVDQLinear):
            continue
        if targets is not None:
            hits = [p for p in targets if fnmatch.fnmatchcase(name, p)]
            if not hits:
                continue
            matched_patterns.update(hits)
        if _matches(name, skip):
            skipped[name] = "skipped by request"
            continue
        divisor, what = (config.vq_dim, "vector dimension") if config.is_vector else (config.group_size, "group size")
        if module.in_features % divisor:
            reason = f"in_features {module.in_features} is not divisible by the {what} {divisor}"
            if targets is not None:
                raise BadInputError(f"layer {name}: {reason}")
            skipped[name] = reason
            continue
        rank = config.effective_rank
        if rank > min(module.in_features, module.out_features):
            raise BadInputError(
                f"layer {name}: rank {rank} exceeds min(out_features, in_features) = "
                f"{min(module.in_features, module.out_features)}"
            )
        chosen[name] = module
    if targets is not None:
        missing = [p for p in targets if p not in matched_patterns]
        if missing:
            raise BadInputError(f"no nn.Linear matches target(s) {', '.join(missing)}")
    if not chosen:
        raise BadInputError("no linear layer to quantize (check targets, skip and the group size or vector dimension)")
    return chosen, skipped


class _Collector:
    """Forward pre-hooks that feed :class:`InputStats`, one per distinct input.

    Layers called back to back on the *same tensor object* (q/k/v on one hidden state) share an input:
    the later ones alias the first one's statistics instead of recording the same rows again. Callers can
    name the groups instead, which turns that detection off.
    """

    def __init__(self, layers: dict[str, nn.Linear], config: QuantConfig, groups: Sequence[Sequence[str]]):
        self.layers = layers
        self._index = {name: index for index, name in enumerate(layers)}  # seeds each input's row sample
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
                self.config.seed * 1_000_003 + self._index[name],
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
    act = "none" if config.weight_only or _matches(names[0], weight_only) else "signed"
    shift = 0.0
    if act == "signed" and config.precision == "int4" and _matches(names[0], nonnegative):
        act, shift = "unsigned", max(0.0, -stats.minimum)
    if not config.smooths:
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
    naive_config = QuantConfig(  # the same number formats (version, range, search) without smoothing or branch
        method="rtn", precision=config.precision, weight_only=config.weight_only, scale_dtype=config.scale_dtype,
        version=config.version, full_range=config.full_range, scale_search=False,
    )
    channels = None
    if module.out_features > MEASURE_CHANNELS:
        generator = torch.Generator().manual_seed(config.seed)
        channels = torch.randperm(module.out_features, generator=generator)[:MEASURE_CHANNELS].sort().values
    weight = module.weight if channels is None else module.weight[channels]
    bias = module.bias if channels is None or module.bias is None else module.bias[channels]
    sampled = nn.Linear(module.in_features, weight.shape[0], bias=bias is not None, device="meta")
    sampled.weight, sampled.bias = nn.Parameter(weight.detach()), None if bias is None else nn.Parameter(bias.detach())
    naive = SVDQLinear.from_linear(sampled, naive_config, act="none" if plan.act == "none" else "signed")
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


def quantize_model(
    model: nn.Module,
    calibrate: Callable[[nn.Module], object],
    config: QuantConfig | None = None,
    targets: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    groups: Sequence[Sequence[str]] = (),
    weight_only: Sequence[str] = (),
    nonnegative: Sequence[str] = (),
    progress: Progress | None = None,
) -> QuantReport:
    """Quantize the target ``nn.Linear`` layers of ``model`` in place, replacing each by an SVDQLinear.

    Args:
        model: any torch module.
        calibrate: called once as ``calibrate(model)``; runs the forward passes that collect statistics
            (running absmax and a bounded, seeded sample of input rows per input — never all activations).
        config: method, precision, rank…; defaults to ``QuantConfig()`` (SVDQuant int4 r32).
        targets: layer names or glob patterns to quantize; default every linear the group size divides.
        skip: names or patterns to leave in 16 bits.
        groups: lists of layer names that read the same input and so share λ. Without it, groups are found
            automatically: layers called back to back on the same tensor object (as q/k/v are).
        weight_only: names or patterns whose activations stay 16-bit (AdaLN modulation linears).
        nonnegative: names or patterns whose inputs are non-negative up to a small shift (after GELU):
            INT activations there are unsigned, with the shift folded into the bias.
        progress: ``progress(layer_name, done, total)`` after each layer.

    Returns:
        A :class:`QuantReport` with one :class:`LayerReport` per quantized layer.

    Raises:
        BadInputError: bad targets or groups, a layer the group size does not divide, rank too large,
            NaN/Inf in weights or activations, a target never called by ``calibrate`` — each naming the layer.
    """
    config = config or QuantConfig()
    layers, skipped = select_targets(model, config, targets, skip)
    for option, patterns in (("weight_only", weight_only), ("nonnegative", nonnegative)):
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in layers)]
        if unmatched:
            raise BadInputError(f"{option} pattern(s) {', '.join(map(repr, unmatched))} match no quantized layer")
    for name, module in layers.items():
        if not torch.isfinite(module.weight).all():
            raise BadInputError(f"layer {name}: weight holds NaN or Inf")
    calibration = collect_statistics(model, layers, calibrate, config, groups)
    report = QuantReport(config=config, skipped=skipped)
    if config.is_vector:
        _quantize_vector(model, layers, calibration, config, report, progress)
        return report

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
    return report


def _quantize_vector(model: nn.Module, layers: dict[str, nn.Linear], calibration: Calibration, config: QuantConfig,
                     report: QuantReport, progress: Progress | None) -> None:
    """VQ4DiT (or k-means VQ) without blocks: each layer calibrated on its own output error over its input's
    calibration rows (``vector.quantize_linear``), replaced by a VQLinear."""
    from .vector import quantize_linear

    owners = {name: owner for owner, names in calibration.members.items() for name in names}

    def quantize_one(item: tuple[int, str]):
        index, name = item
        rows = calibration.stats[owners[name]].sample(config.calib_rows)
        return quantize_linear(layers[name], rows, config, config.seed + index)

    for name, result in zip(layers, parallel_map(quantize_one, list(enumerate(layers))), strict=True):
        replace_module(model, name, result.layers[""])
        fields = {k: v for k, v in result.reports[""].items() if k in LayerReport.__dataclass_fields__}
        report.layers.append(LayerReport(**{**fields, "name": name, "group": owners[name],
                                            "seconds": result.seconds}))
        if progress:
            progress(name, len(report.layers), len(layers))


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


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
