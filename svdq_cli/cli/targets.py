"""``svdq targets MODEL``: what a quantization of MODEL would quantize, and why — before any calibration."""

from __future__ import annotations

import json
from collections import Counter
from typing import Annotated

import torch
import typer
from rich.table import Table

from .common import BaseOpt, JsonOpt, PromptsOpt, SkipOpt, WeightOnlyLayersOpt, out, quiet_libraries, target_overrides


def targets(
    model: Annotated[str, typer.Argument(help="Recipe name, tiny model, local diffusers directory or Hub repo id.")],
    recipe: Annotated[str | None, typer.Option(help="Recipe name or YAML file; default: MODEL's own.")] = None,
    method: Annotated[str | None, typer.Option(help="Quantization method (default: the recipe's).")] = None,
    precision: Annotated[str | None, typer.Option(help="int4, nvfp4 or int8 (default: the recipe's).")] = None,
    base: BaseOpt = None,
    prompts: PromptsOpt = None,
    skip: SkipOpt = None,
    weight_only_layers: WeightOnlyLayersOpt = None,
    device: Annotated[str | None, typer.Option(help="Where the pipeline runs the one traced call (default: the "
                                                    "recipe's).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Each linear of the model's denoiser: W4A4, weight-only or 16-bit, with the reason, its group (members share
    the smoothing factor) and the share of parameters quantized, per block list. The model is loaded and traced
    once on the first calibration prompt (its denoiser on the meta device), and the convolutions that stay
    16-bit are counted; nothing is written."""
    from ..stages.workspace import Workspace
    from .quantize import resolve_model

    overrides = {"quant.method": method, "quant.precision": precision, "device": device, "calibration.prompts": prompts,
                 **target_overrides(skip, weight_only_layers)}
    config = resolve_model(model, recipe, overrides, base)
    quiet_libraries()
    workspace = Workspace(config)
    _, rows = workspace.planned
    lists = _block_lists(rows)
    whole = _parameters(workspace.denoiser, rows)
    result = {"model": config.model, "family": config.family, "method": config.quant.method,
              "precision": config.quant.precision, "block_lists": lists, "parameters": whole,
              "layers": [{"name": r.name, "block": r.block, "in_features": r.in_features,
                          "out_features": r.out_features, "mode": r.mode, "reason": r.reason, "group": r.group}
                         for r in rows]}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    summary = Table(title=f"{config.model}: {config.quant.method} {config.quant.precision}")
    for column in ("block list", "blocks", "quantized", "weight-only", "16-bit", "parameters quantized"):
        summary.add_column(column, justify="left" if column == "block list" else "right")
    for name, entry in lists.items():
        summary.add_row(name, str(entry["blocks"]), str(entry["quantized"]), str(entry["weight_only"]),
                        str(entry["kept"]), f"{entry['parameters_quantized']:.1%}")
    out.print(summary)
    convolutions = (f"; {whole['convolutions']} convolutions ({whole['convolution_parameters'] / whole['total']:.1%}) "
                    "stay 16-bit") if whole["convolutions"] else ""
    out.print(f"{whole['quantized'] / whole['total']:.1%} of the denoiser's {whole['total'] / 1e6:,.1f} M parameters "
              f"are quantized{convolutions}")
    table = Table(title="linears of the first block of each list, and those outside the blocks")
    for column in ("layer", "in", "out", "mode", "group", "why"):
        table.add_column(column, justify="right" if column in ("in", "out", "group") else "left")
    shown = {entry["first"] for entry in lists.values()}
    for row in rows:
        if row.block is None or row.block in shown:
            table.add_row(row.name, str(row.in_features), str(row.out_features), row.mode,
                          "" if row.group is None else str(row.group), row.reason)
    out.print(table)


def _parameters(denoiser, rows) -> dict[str, int]:
    """The denoiser's parameters: all, in quantized linears (weights), and in convolutions (a UNet's resnets),
    which stay 16-bit."""
    convolutions = [m for m in denoiser.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    return {"total": sum(p.numel() for p in denoiser.parameters()),
            "quantized": sum(r.in_features * r.out_features for r in rows if r.mode != "16-bit"),
            "convolutions": len(convolutions),
            "convolution_parameters": sum(p.numel() for m in convolutions for p in m.parameters())}


def _block_lists(rows) -> dict[str, dict]:
    """Per block list (``transformer_blocks``; ``(outside)`` for the rest): counts and parameters quantized."""
    lists: dict[str, dict] = {}
    for row in rows:
        name = row.block.rpartition(".")[0] if row.block else "(outside)"
        entry = lists.setdefault(name, {"first": row.block, "blocks": set(), "modes": Counter(), "params": Counter()})
        if row.block:
            entry["blocks"].add(row.block)
        entry["modes"][row.mode] += 1
        entry["params"][row.mode != "16-bit"] += row.in_features * row.out_features
    return {name: {"first": e["first"], "blocks": len(e["blocks"]),
                   "quantized": sum(n for mode, n in e["modes"].items() if mode not in ("weight-only", "16-bit")),
                   "weight_only": e["modes"]["weight-only"], "kept": e["modes"]["16-bit"],
                   "parameters_quantized": e["params"][True] / max(1, sum(e["params"].values()))}
            for name, e in lists.items()}
