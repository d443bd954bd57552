"""Public Python API: quantize the linear layers of any torch module in place (DESIGN.md §3).

The CLI's stages and the benchmarks go through the same engines (``engines/``), so comparisons are like for
like. This module only selects the targets, collects the statistics and hands them to the method's engine.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .calibration.collector import collect_statistics
from .engines import uniform, vector
from .engines.reports import LayerReport, Progress, QuantReport
from .engines.uniform import matches
from .errors import BadInputError
from .methods.config import QuantConfig
from .runtime.linear import SVDQLinear

__all__ = ["LayerReport", "QuantReport", "quantize_model", "select_targets"]

ENGINES = {"uniform": uniform.quantize_layers, "vector": vector.quantize_layers}  # Method.engine → the engine


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
        if matches(name, skip):
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
    engine = ENGINES[config.spec.engine]
    engine(model, layers, calibration, config, report, progress, weight_only=weight_only, nonnegative=nonnegative)
    return report

