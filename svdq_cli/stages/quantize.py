"""quantize: the 4-bit residual of every layer (round-to-nearest or GPTQ) packed into SVDQLinear tensors,
with each layer's output error on calibration rows against the 16-bit layer and naive quantization. VQ methods
calibrate each block's codebooks and assignments here instead (``engines/vector.py``), one artifact per block."""

from __future__ import annotations

import dataclasses
import json
import time

from torch import nn

from ..calibration.block_inputs import calls_from_artifact
from ..engines.uniform import group_hessian, input_gram, measure_layer, quantize_layer
from ..engines.vector import BlockResult, quantize_block
from ..runtime.layers import load_layer
from ..runtime.linear import SVDQLinear
from ..system.threads import parallel_map
from .base import Stage, block_artifact, for_each_block, json_meta, quant_fields
from .smooth import group_stats, load_plans

VQ_FIELDS = ("method", "bits", "vq_dim", "vq_candidates", "vq_steps", "vq_lr", "vq_ratio_weight", "kmeans_iters",
             "seed")


def reads(config) -> dict:
    if config.quant.is_vector:
        return quant_fields(config, *VQ_FIELDS)
    return quant_fields(config, "precision", "gptq", "gptq_damp", "gptq_block", "scale_dtype", "search_rows",
                        "full_range", "scale_search", "act_range")


def load_block_layers(run, index: int) -> dict[str, tuple[nn.Module, dict]]:
    """The quantized layers of block ``index`` with their reports: name → (SVDQLinear or VQLinear, report)."""
    tensors, metadata = run.read("quantize", block_artifact("quantize", index))
    layers = {}
    for name, text in metadata.items():
        entry = json.loads(text)
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        layers[name] = (load_layer(own, entry["layer"]), entry["report"])
    return layers


def run(run, workspace) -> dict:
    config = workspace.config
    if config.quant.is_vector:
        for_each_block(run, workspace, "quantize",
                       lambda index, block, groups: vq_artifact(block, vq_block(run, workspace, index)))
        return {"layers": len(workspace.originals)}

    def compute(index: int, block: str, groups: list[list[str]]):
        collected, _ = run.read("collect", block_artifact("collect", index))
        factors, _ = run.read("svd", block_artifact("svd", index))
        plans = load_plans(run, index)
        owners = {name: group[0] for group in groups for name in group}
        stats = {owner: group_stats(collected, owner) for owner in set(owners.values())}

        def quantized(name: str) -> tuple[SVDQLinear, dict]:
            owner, module = owners[name], workspace.originals[name]
            plan, inputs = plans[owner], stats[owner]
            begin = time.perf_counter()
            layer = quantize_layer(module, config.quant, plan,
                                   group_hessian(inputs, plan, module.in_features, config.quant),
                                   (factors[f"{name}.lora_down"], factors[f"{name}.lora_up"]),
                                   input_gram(inputs, plan, config.quant))
            report = measure_layer(name, owner, module, layer, plan, inputs.sample(config.quant.search_rows),
                                   config.quant, time.perf_counter() - begin)
            report_fields = dataclasses.asdict(report)
            report_fields.pop("seconds")  # timings stay out of artifacts: reruns are byte-identical
            return layer, {"layer": layer.layer_metadata(), "report": report_fields}

        tensors, metadata = {}, {}
        for name, (layer, entry) in zip(owners, parallel_map(quantized, owners), strict=True):
            tensors.update({f"{name}.{key}": value for key, value in layer.state_dict().items()})
            metadata[name] = entry
        return tensors, json_meta(metadata)

    for_each_block(run, workspace, "quantize", compute)
    return {"layers": len(workspace.originals)}


def vq_block(run, workspace, index: int, quant=None) -> BlockResult:
    """Block ``index`` vector-quantized by block-wise calibration on its collected input calls (``quant``: another
    VQ config than the run's, the k-means baseline)."""
    block, groups = workspace.blocks[index]
    tensors, metadata = run.read("collect", block_artifact("collect", index))
    names = [name[len(block) + 1:] for group in groups for name in group]
    quant = quant or workspace.config.quant
    return quantize_block(workspace.denoiser.get_submodule(block), names, calls_from_artifact(tensors, metadata),
                          quant, seed=quant.seed * 7919 + index)


def vq_artifact(block: str, result: BlockResult) -> tuple[dict, dict]:
    """A VQ block's quantize artifact: the layers' tensors by full name, and per layer its format facts and
    report (with the block's output error before and after calibration)."""
    tensors, entries = {}, {}
    for relative, layer in result.layers.items():
        name = f"{block}.{relative}"
        tensors.update({f"{name}.{key}": value for key, value in layer.state_dict().items()})
        entries[name] = {"layer": layer.layer_metadata(), "report": {
            **result.reports[relative], "name": name, "group": name,
            "block_error_before": result.error_before, "block_error_after": result.error_after}}
    return tensors, json_meta(entries)


STAGE = Stage("quantize", ("svd", "collect"), reads, run)
