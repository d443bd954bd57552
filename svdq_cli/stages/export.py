"""export: one self-describing safetensors file with the quantized transformer (see export_format)."""

from __future__ import annotations

import json

from .. import __version__
from ..artifacts import CorruptArtifactError
from ..export_format import FORMAT_VERSION, export_name
from . import Stage
from .quantize import load_block_layers


def reads(config) -> dict:
    return {"format": FORMAT_VERSION}


def validate_summary(run) -> dict:
    record = run.manifest["stages"].get("validate", {})
    if record.get("status") != "done":
        return {"ran": False}
    relative = "validate/report.json"
    if not run.artifact_ok("validate", relative):
        raise CorruptArtifactError(f"{run.path / relative} does not match its checksum; run `svdq validate` again")
    report = json.loads((run.path / relative).read_text())
    return {"ran": True, "passed": report["passed"], "methods": {
        method: {key: values[key] for key in ("psnr", "ssim", "latent_error")}
        for method, values in report["methods"].items()}, "gates": report["gates"]}


def run(run, workspace) -> dict:
    from ..artifacts import safetensors_bytes

    config = workspace.config
    transformer = workspace.transformer
    tensors, layers = {}, {}
    for index in range(len(workspace.blocks)):
        for name, (layer, _) in load_block_layers(run, index).items():
            layers[name] = layer.layer_metadata()
            tensors.update({f"{name}.{key}": value for key, value in layer.state_dict().items()})
    quantized_params = {f"{name}.{suffix}" for name in layers for suffix in ("weight", "bias")}
    for key, value in transformer.state_dict().items():
        if key not in quantized_params:
            tensors[key] = value.detach().cpu().contiguous()
    # Private keys (_use_default_values, _diffusers_version…) are diffusers bookkeeping, some built from sets
    # whose order changes between processes; the model is fully described without them.
    model_config = {key: value for key, value in dict(transformer.config).items() if not key.startswith("_")}
    metadata = {
        "format_version": FORMAT_VERSION,
        "quantization_config": json.dumps(config.quant.to_dict(), sort_keys=True),
        "model_config": json.dumps({"class": type(transformer).__name__, "family": config.family,
                                    "config": model_config}, sort_keys=True, default=str),
        "recipe": json.dumps(config.to_dict(), sort_keys=True),
        "svdq_version": __version__,
        "validate": json.dumps(validate_summary(run), sort_keys=True),
        "layers": json.dumps(layers, sort_keys=True),
    }
    name = export_name(config.quant.precision, config.quant.effective_rank, config.model)
    data = safetensors_bytes(tensors, metadata)
    run.write_file("export", f"export/{name}", data)
    return {"file": f"export/{name}", "bytes": len(data)}


STAGE = Stage("export", ("validate", "quantize"), reads, run, keeps_previous=True)
