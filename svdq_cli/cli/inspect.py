"""``svdq inspect FILE``: what an svdq or Nunchaku file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    JsonOpt,
    out,
)


def inspect(file: Annotated[Path, typer.Argument(help="An exported .safetensors file.")], as_json: JsonOpt = False):
    """What a quantized file holds: format, precision, rank, per-layer shapes and bytes, size vs bf16, validation."""
    from ..formats.svdq_file import is_nunchaku, layer_inventory, read_metadata, read_raw_metadata

    if is_nunchaku(raw := read_raw_metadata(file)):
        _inspect_nunchaku(file, raw, as_json)
        return
    metadata = read_metadata(file)
    quant = metadata["quantization_config"]
    layers, other_bytes = layer_inventory(file, metadata["layers"])
    bf16 = other_bytes + sum(2 * (layer["in_features"] * layer["out_features"] + layer["out_features"])
                             for layer in layers)
    result = {"file": str(file), "format_version": metadata["format_version"], "model": metadata["recipe"]["model"],
              "method": quant["method"], "precision": quant["precision"], "rank": quant["rank"],
              **({"bits": quant["bits"], "vq_dim": quant["vq_dim"]} if quant.get("bits") else {}),
              "quantized_layers": len(layers), "bytes": file.stat().st_size, "bytes_bf16": bf16,
              "loras": metadata.get("loras", []), "validate": metadata["validate"], "layers": layers}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    summary = Table(title=str(file), show_header=False)
    for key, value in result.items():
        if key != "layers":
            summary.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    summary.add_row("size vs bf16", f"{bf16 / result['bytes']:.2f}× smaller")
    out.print(summary)
    table = Table(title="quantized layers")
    for column in ("layer", "in", "out", "rank", "act", "bytes"):
        table.add_column(column, justify="left" if column in ("layer", "act") else "right")
    for layer in layers:
        table.add_row(layer["name"], str(layer["in_features"]), str(layer["out_features"]), str(layer["rank"]),
                      layer["act"], str(layer["bytes"]))
    out.print(table)


def _inspect_nunchaku(file: Path, raw: dict[str, str], as_json: bool) -> None:
    from safetensors import safe_open

    from ..formats.svdq_file import decode_metadata

    metadata = decode_metadata(file, raw, plain=("model_class", "svdq_version"))
    quant, recipe = metadata["quantization_config"], metadata["svdq_recipe"]
    with safe_open(str(file), "pt") as handle:
        layers = sorted(key[: -len(".qweight")] for key in handle.keys() if key.endswith(".qweight"))
    result = {"file": str(file), "format": "nunchaku", "model_class": metadata["model_class"],
              "model": recipe["model"], "precision": quant["weight"]["dtype"], "rank": quant["rank"],
              "quantized_layers": len(layers), "bytes": file.stat().st_size, "svdq_version": metadata["svdq_version"]}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    summary = Table(title=f"{file} (Nunchaku's Flux checkpoint, written by svdq)", show_header=False)
    for key, value in result.items():
        summary.add_row(key, str(value))
    out.print(summary)
