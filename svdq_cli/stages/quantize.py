"""quantize: the 4-bit residual of every layer (round-to-nearest or GPTQ) packed into SVDQLinear tensors,
with each layer's output error on calibration rows against the 16-bit layer and naive quantization."""

from __future__ import annotations

import dataclasses
import json
import time

from ..api import group_hessian, input_gram, measure_layer, quantize_layer
from ..runtime.linear import SVDQLinear
from ..threads import parallel_map
from . import Stage, block_artifact, for_each_block, json_meta, quant_fields
from .smooth import group_stats, load_plans


def reads(config) -> dict:
    return quant_fields(config, "precision", "gptq", "gptq_damp", "gptq_block", "scale_dtype", "search_rows",
                        "full_range", "scale_search")


def load_block_layers(run, index: int) -> dict[str, tuple[SVDQLinear, dict]]:
    """The quantized layers of block ``index`` with their reports: name → (SVDQLinear, report dict)."""
    tensors, metadata = run.read("quantize", block_artifact("quantize", index))
    layers = {}
    for name, text in metadata.items():
        entry = json.loads(text)
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        layers[name] = (SVDQLinear.from_state_dict(own, entry["layer"]), entry["report"])
    return layers


def run(run, workspace) -> dict:
    config = workspace.config

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


STAGE = Stage("quantize", ("svd", "collect"), reads, run)
