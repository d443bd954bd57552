"""export: one self-describing safetensors file with the quantized denoiser (see formats/svdq_file.py), written
block by block."""

from __future__ import annotations

import json
from pathlib import Path

from ..formats.svdq_file import FORMAT_VERSION, export_name
from ..system.files import CorruptArtifactError, file_layout
from ..version import __version__
from .base import Stage, block_artifact


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
    """Write the export block by block (header first, from the artifacts' headers), so the file is never
    assembled in memory: what is resident is one block's quantized layers and 16-bit tensors."""
    config = workspace.config
    denoiser = workspace.denoiser
    blocks = [quantized_tensors_layout(run, index) for index in range(len(workspace.blocks))]
    layers = {name: facts for _, block_layers in blocks for name, facts in block_layers.items()}
    state = denoiser.state_dict()  # a streamed denoiser's block tensors are empty: only shapes are used
    block_names = [[n for n in state if n.startswith(f"{block}.") and _owner(n) not in layers]
                   for block, _ in workspace.blocks]
    in_blocks = {n for names in block_names for n in names} | {n for n in state if _owner(n) in layers}
    resident = sorted(n for n in state if n not in in_blocks)
    layout = {n: (state[n].dtype, tuple(state[n].shape)) for n in resident}
    for (quantized, _), names in zip(blocks, block_names, strict=True):
        merged = {**quantized, **{n: (state[n].dtype, tuple(state[n].shape)) for n in names}}
        layout.update((n, merged[n]) for n in sorted(merged))
    name = export_name(config.quant, config.model)
    metadata = export_metadata(run, config, workspace.adapter.denoiser, denoiser, layers)
    with run.writer("export", f"export/{name}", layout, metadata) as out:
        for key in resident:
            out.write(key, state[key].detach())
        for index, names in enumerate(block_names):
            tensors, _ = run.read("quantize", block_artifact("quantize", index))
            wanted = set(names)
            tensors.update({n: t for n, t in workspace.block_state(index).items() if n in wanted})
            for key in sorted(tensors):
                out.write(key, tensors[key])
    return {"file": f"export/{name}", "bytes": (run.path / "export" / name).stat().st_size}


def _owner(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def quantized_tensors_layout(run, index: int) -> tuple[dict, dict[str, dict]]:
    """The (dtype, shape) of every tensor of block ``index``'s quantize artifact, and its layers' format
    facts, from the file's header alone."""
    relative = block_artifact("quantize", index)
    layers = {name: json.loads(text)["layer"] for name, text in run.read_metadata("quantize", relative).items()}
    return file_layout(run.path / relative), layers


def base_model(model: str) -> str:
    """How a loader finds the 16-bit model again from anywhere: a local directory as its absolute path (the
    run may have named it relative to where it ran); a Hub id or a built-in tiny model as it is."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def export_metadata(run, config, component: str, denoiser, layers: dict[str, dict]) -> dict[str, str]:
    # Private keys (_use_default_values, _diffusers_version…) are diffusers bookkeeping, some built from sets
    # whose order changes between processes; the model is fully described without them.
    model_config = {key: value for key, value in dict(denoiser.config).items() if not key.startswith("_")}
    return {
        "format_version": FORMAT_VERSION,
        "quantization_config": json.dumps(config.quant.to_dict(), sort_keys=True),
        "model_config": json.dumps({"class": type(denoiser).__name__, "component": component,
                                    "family": config.family, "config": model_config}, sort_keys=True, default=str),
        # how the run read its model (streamed or whole) is not what it computed: the file is the same either way
        "recipe": json.dumps({k: v for k, v in config.to_dict().items() if k != "stream"}, sort_keys=True),
        "base_model": json.dumps(base_model(config.model)),
        "svdq_version": __version__,
        "validate": json.dumps(validate_summary(run), sort_keys=True),
        "layers": json.dumps(layers, sort_keys=True),
    }


STAGE = Stage("export", ("validate", "quantize"), reads, run, keeps_previous=True)
