"""``svdq lora apply EXPORT LORA...``: join LoRAs to an export's low-rank branches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import BadInputError
from .common import (
    JsonOpt,
    out,
)


def lora_apply(
    export_file: Annotated[Path, typer.Argument(metavar="EXPORT", help="An exported svdq .safetensors file.")],
    loras: Annotated[list[Path], typer.Argument(metavar="LORA...", help="LoRA .safetensors files; they stack.")],
    scale: Annotated[float, typer.Option(help="Strength applied to every LoRA (times its own alpha/rank).")] = 1.0,
    out_file: Annotated[Path | None, typer.Option("--out", help="Output file (default: EXPORT with +lora).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Join LoRAs to the low-rank branch of quantized layers (merge them into 16-bit layers)."""
    from ..ship.lora import apply_lora

    target = out_file or export_file.with_name(f"{export_file.stem}+lora.safetensors")
    if target.resolve() == export_file.resolve():
        raise BadInputError(f"--out {target} is the export itself: write the model with LoRAs to another file "
                            "(the export stays the run's verified artifact)")
    source, results = export_file, []
    for lora in loras:
        results.append(apply_lora(source, lora, scale, target))
        source = target
    if as_json:
        print(json.dumps({"out": str(target), "applied": results}, indent=2))
    else:
        for lora, result in zip(loras, results, strict=True):
            out.print(f"{lora.name}: joined to {result['joined']} quantized layers, merged into "
                      f"{result['merged']} 16-bit layers")
        out.print(f"wrote {target}")
