"""Vector quantization of whole blocks and of single layers (VQ4DiT and its k-means baseline).

:func:`quantize_block` is the block-wise calibration of the paper: a float32 copy of the block runs its
sampled 16-bit inputs once for the reference outputs, its target linears are replaced by
:class:`~svdq_cli.quant.vq.SoftVQLinear` layers, and Adam lowers the relative error of the block's outputs
(``quant/vq.py`` says how). The original block is never modified. :func:`quantize_linear` is the same with
the layer as its own block and batches of its calibration rows as inputs (the API on modules without blocks).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..methods.baselines import uniform_at_bits
from ..methods.config import QuantConfig
from ..quant.svdquant import relative_error
from ..quant.vq import SoftVQLinear, VQShape, calibrate, relative_output_error
from ..runtime.layers import replace_module
from ..runtime.linear import SVDQLinear
from ..runtime.vq_linear import VQLinear
from ..system.threads import parallel_map
from .reports import LayerReport, Progress, QuantReport

Call = tuple[tuple, dict]  # one forward call of a block: positional and keyword arguments
REPORT_ROWS = 256  # input rows per layer (drawn evenly from the calls) the per-layer report is measured on


@dataclass
class BlockResult:
    """A block's VQ layers (by name relative to the block), their reports, and the block's output error."""

    layers: dict[str, VQLinear]
    reports: dict[str, dict]
    error_before: float  # k-means, nearest codeword
    error_after: float
    seconds: float


def map_tensors(fn, value):
    """``value`` with ``fn`` applied to every tensor inside it (tuples, lists, dicts, model outputs as tuples)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if hasattr(value, "to_tuple"):  # diffusers/transformers ModelOutput
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    return value


def detached(value):
    return map_tensors(torch.Tensor.detach, value)


def quantize_block(block: nn.Module, names: Sequence[str], calls: Sequence[Call], config: QuantConfig,
                   seed: int = 0) -> BlockResult:
    """Vector-quantize the linears ``names`` (paths inside ``block``) by block-wise calibration on ``calls``.

    Step ``s`` of the calibration uses call ``s mod len(calls)``. A method that does not
    calibrate assignments (``kmeans``, the baseline) keeps k-means' and tunes the codebooks alone.
    """
    start = time.perf_counter()
    work = copy.deepcopy(block).float()
    device = next(work.parameters()).device

    def to_work(tensor: torch.Tensor) -> torch.Tensor:  # the calibration's precision, on the block's device
        return (tensor.float() if tensor.is_floating_point() else tensor).to(device)

    calls = [map_tensors(to_work, call) for call in calls]
    modules = {name: work.get_submodule(name) for name in names}
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    per_call = -(-REPORT_ROWS // max(1, len(calls)))
    generators = {name: torch.Generator().manual_seed(seed + index) for index, name in enumerate(names)}

    def capture(name: str, x: torch.Tensor) -> None:  # a seeded few rows per call: bounded whatever the tokens
        rows = x.detach().reshape(-1, x.shape[-1])
        captured[name].append(rows[torch.randperm(rows.shape[0], generator=generators[name])[:per_call]].cpu())

    hooks = [module.register_forward_pre_hook(lambda _m, args, name=name: capture(name, args[0]))
             for name, module in modules.items()]
    with torch.no_grad():
        references = [detached(work(*args, **kwargs)) for args, kwargs in calls]
    for hook in hooks:
        hook.remove()
    shape = VQShape(config.vq_dim, config.bits)
    trainable = config.spec.calibrates_assignments
    soft = {name: SoftVQLinear(module, shape, seed * 1_000_003 + index, config.vq_candidates, config.kmeans_iters,
                               trainable)
            for index, (name, module) in enumerate(modules.items())}
    for name, layer in soft.items():
        replace_module(work, name, layer)

    def distortion(step: int) -> torch.Tensor:
        args, kwargs = calls[step % len(calls)]
        return relative_output_error(work(*args, **kwargs), references[step % len(calls)])

    result = calibrate(list(soft.values()), distortion, config.vq_steps, config.vq_lr, config.vq_ratio_weight)
    originals = {name: block.get_submodule(name) for name in names}
    layers = {name: VQLinear.from_parts(layer.final_codebook(), layer.assignments(), originals[name].bias,
                                        bits=config.bits, dtype=originals[name].weight.dtype, method=config.method)
              for name, layer in soft.items()}
    reports = {name: layer_report(originals[name], layers[name], torch.cat(captured[name]), config) for name in names}
    return BlockResult(layers, reports, result.error_before, result.error_after, time.perf_counter() - start)


def layer_report(module: nn.Linear, layer: VQLinear, rows: torch.Tensor, config: QuantConfig) -> dict:
    """Output errors of ``layer`` and of RTN at the same bits against the 16-bit ``module`` on ``rows`` (the
    report's ``before`` is that uniform baseline, as SVDQuant's is naive RTN)."""
    x = rows.to(module.weight.dtype)
    with torch.no_grad():
        reference = nn.functional.linear(x.float(), module.weight.float(),
                                         None if module.bias is None else module.bias.float())
        after = layer.reference_forward(x).float()
        before = SVDQLinear.from_linear(module, uniform_at_bits(config))(x).float()
    return {
        "name": "", "group": "", "act": "none", "alpha": 0.0, "beta": 0.0, "shift": 0.0, "rank": 0,
        "mse_before": torch.mean((before - reference) ** 2).item(),
        "mse_after": torch.mean((after - reference) ** 2).item(),
        "relative_error_before": relative_error(before, reference),
        "relative_error_after": relative_error(after, reference),
        "bytes_before": sum(p.numel() * p.element_size() for p in module.parameters()),
        "bytes_after": layer.nbytes(),
        "bits_per_weight": layer.bits_per_weight(),
    }


LAYER_BATCH = 128  # calibration rows per step when a layer is calibrated on its own


def quantize_linear(module: nn.Linear, rows: torch.Tensor, config: QuantConfig, seed: int = 0) -> BlockResult:
    """Vector-quantize one layer on its own output error over ``rows`` (batches of :data:`LAYER_BATCH`)."""
    calls = [((rows[start:start + LAYER_BATCH],), {}) for start in range(0, rows.shape[0], LAYER_BATCH)]
    result = quantize_block(nn.Sequential(module), ["0"], calls, config, seed)
    return BlockResult({"": result.layers["0"]}, {"": result.reports["0"]}, result.error_before,
                       result.error_after, result.seconds)


def quantize_layers(model: nn.Module, layers: dict[str, nn.Linear], calibration, config: QuantConfig,
                    report: QuantReport, progress: Progress | None, weight_only: Sequence[str] = (),
                    nonnegative: Sequence[str] = ()) -> None:
    """VQ4DiT (or k-means VQ) without blocks: each layer calibrated on its own output error over its input's
    calibration rows (:func:`quantize_linear`), replaced by a VQLinear. ``weight_only`` and ``nonnegative`` do
    not apply: VQ keeps every activation in 16 bits."""
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
