"""The single-file export (DESIGN.md §4) and loading it back into a diffusers pipeline.

``svdq-{int4|fp4}_r{rank}-{model}.safetensors`` (``svdq-vq{bits}_d{dim}-{model}`` for VQ4DiT) holds every
tensor of the denoiser (transformer or UNet) — quantized layers as their SVDQLinear (or VQLinear) tensors under
the layer's path, every other parameter and buffer in 16 bits — and string metadata: ``format_version``,
``quantization_config``, ``model_config`` (denoiser class, pipeline component, config, family), ``recipe``,
``svdq_version``, ``validate`` (summary) and ``layers`` (per-layer format facts).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import BadInputError
from ..models.loading import adapter_of, load_pipeline
from ..models.streaming import empty_model
from ..runtime.layers import load_layer, replace_module
from ..system.device import resolve_device
from ..system.files import file_layout

# 2: layers record how their activations are quantized (``act_range``: full-range scales from QuantConfig
# version 2); a version-1 file's layers all quantize activations with max|x|/7. Both are read.
FORMAT_VERSION = "2"
READABLE_FORMATS = ("1", "2")
PLAIN_KEYS = ("format_version", "svdq_version")  # plain strings; every other metadata value is JSON
PRECISION_TAGS = {"int4": "int4", "nvfp4": "fp4", "int8": "int8"}


def export_name(config, model: str) -> str:
    """``svdq-int4_r32-…`` (SVDQuant formats), ``svdq-vq2_d4-…`` (VQ4DiT at 2 bits, 4-wide vectors) or
    ``svdq-kmvq2_d4-…`` (the k-means baseline) for a QuantConfig."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name).strip("-") or "model"
    if config.is_vector:
        return f"svdq-{config.spec.file_tag}{config.bits}_d{config.vq_dim}-{stem}.safetensors"
    return f"svdq-{PRECISION_TAGS[config.precision]}_r{config.effective_rank}-{stem}.safetensors"


def read_raw_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file.

    Raises:
        BadInputError: missing, a directory, or not a safetensors file.
    """
    if Path(path).is_dir():
        raise BadInputError(f"{path} is a directory, not an exported .safetensors file")
    try:
        with safe_open(str(path), "pt") as handle:
            return handle.metadata() or {}
    except FileNotFoundError:
        raise BadInputError(f"{path} does not exist") from None
    except Exception as error:  # safetensors raises its own error types for malformed headers
        raise BadInputError(f"{path} is not a safetensors file ({type(error).__name__})") from None


def is_nunchaku(raw: dict[str, str]) -> bool:
    """Whether metadata is that of the Nunchaku checkpoint ``svdq export --format nunchaku`` writes."""
    return "model_class" in raw and "svdq_recipe" in raw and "format_version" not in raw


def decode_metadata(path: Path, raw: dict[str, str], plain: tuple[str, ...] = PLAIN_KEYS) -> dict[str, object]:
    """JSON-decode every metadata value but the ``plain`` ones.

    Raises:
        BadInputError: a value that is not valid JSON (a damaged file, or not svdq's).
    """
    decoded = {}
    for key, value in raw.items():
        try:
            decoded[key] = value if key in plain else json.loads(value)
        except ValueError:
            raise BadInputError(f"{path}: metadata {key!r} is not valid JSON (the file is damaged or was not "
                                "written by svdq)") from None
    return decoded


def read_metadata(path: Path) -> dict[str, object]:
    """The decoded metadata of an svdq export.

    Every command and loader that reads an export comes here, so a format this svdq does not know (a newer
    svdq wrote it) is refused before anything reads, or writes from, its contents.

    Raises:
        BadInputError: not a safetensors file, not one of ours, a format this svdq cannot read, or damaged
            metadata.
    """
    raw = read_raw_metadata(path)
    if is_nunchaku(raw):
        raise BadInputError(f"{path} is svdq's Nunchaku checkpoint, which Nunchaku loads; svdq loads the svdq "
                            "export it was converted from (export/ in the run directory)")
    if "format_version" not in raw or "quantization_config" not in raw:
        raise BadInputError(f"{path} is not an svdq export (no svdq metadata)")
    if raw["format_version"] not in READABLE_FORMATS:
        raise BadInputError(f"{path} has export format {raw['format_version']}; this svdq reads "
                            f"{', '.join(READABLE_FORMATS)} (a newer svdq wrote it: upgrade)")
    metadata = decode_metadata(path, raw)
    for key in ("quantization_config", "recipe", "layers", "model_config"):
        if not isinstance(metadata.get(key), dict):
            raise BadInputError(f"{path}: metadata {key!r} is missing or malformed (the file is damaged or was not "
                                "written by svdq)")
    return metadata


def layer_inventory(path: Path, layers: dict[str, dict[str, str]]) -> tuple[list[dict[str, object]], int]:
    """Per quantized layer: shapes, rank, activation mode and stored bytes; plus the bytes of everything else."""
    layout = file_layout(path)
    sizes = {key: math.prod(shape) * dtype.itemsize for key, (dtype, shape) in layout.items()}
    shapes = {key: shape for key, (_, shape) in layout.items()}
    inventory = []
    for name, facts in sorted(layers.items()):
        own = [key for key in sizes if key.startswith(f"{name}.")]
        vector = facts.get("format") == "vq"
        inventory.append({"name": name, "in_features": int(facts["in_features"]),
                          "out_features": int(facts["out_features"]),
                          "rank": 0 if vector else shapes[f"{name}.lora_down"][0],
                          "act": "none" if vector else facts["act"], "bytes": sum(sizes[key] for key in own)})
    quantized = {key for entry in inventory for key in sizes if key.startswith(f"{entry['name']}.")}
    return inventory, sum(size for key, size in sizes.items() if key not in quantized)


def layer_state(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """One quantized layer's tensors out of a whole export, keyed as its ``state_dict()``."""
    prefix = f"{name}."
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def load_quantized(path: Path | str, pipeline=None, device: str | torch.device = "cpu"):
    """Rebuild the quantized denoiser of an export; with ``pipeline``, install it there.

    Args:
        path: the exported ``.safetensors`` file.
        pipeline: a diffusers pipeline of the same model to receive the denoiser (optional).
        device: where the denoiser's tensors go.

    Returns:
        The pipeline when one was given, else the denoiser.
    """
    import diffusers
    from accelerate.utils import set_module_tensor_to_device

    metadata = read_metadata(Path(path))
    device = resolve_device(str(device))
    model_config = metadata["model_config"]
    component = model_config.get("component", "transformer")  # older exports: always a transformer
    if pipeline is not None and getattr(pipeline, component, None) is not None:
        _check_same_denoiser(path, model_config, getattr(pipeline, component))
    denoiser_class = getattr(diffusers, model_config["class"])
    dtype = getattr(torch, metadata["recipe"]["dtype"])
    denoiser = empty_model(denoiser_class, model_config["config"], dtype)  # no 16-bit weights allocated
    layers = metadata["layers"]
    with safe_open(str(path), "pt", device=str(device)) as handle:  # tensor by tensor: the file once in memory
        layer_keys: dict[str, list[str]] = {name: [] for name in layers}
        other_keys = []
        for key in handle.keys():
            owner = key.rpartition(".")[0]
            (layer_keys[owner] if owner in layer_keys else other_keys).append(key)
        for name, keys in layer_keys.items():
            state = {key[len(name) + 1:]: handle.get_tensor(key) for key in keys}
            replace_module(denoiser, name, load_layer(state, layers[name]))
        expected = denoiser.state_dict(keep_vars=True)
        unexpected = [key for key in other_keys if key not in expected]
        for key in other_keys:
            if key in expected:
                set_module_tensor_to_device(denoiser, key, device, value=handle.get_tensor(key).clone(),
                                            clear_cache=False)
    missing = [key for key, tensor in denoiser.state_dict(keep_vars=True).items() if tensor.device.type == "meta"]
    if missing or unexpected:
        raise BadInputError(f"{path} does not fit {model_config['class']}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    denoiser.to(device)
    if pipeline is None:
        return denoiser
    setattr(pipeline, component, denoiser)
    return pipeline


def _check_same_denoiser(path: Path | str, model_config: dict, denoiser) -> None:
    """The pipeline's denoiser must be the exported model's architecture: replacing another one silently
    would give a pipeline whose other parts do not fit its denoiser."""
    if type(denoiser).__name__ != model_config["class"]:
        raise BadInputError(f"{path} holds a {model_config['class']}; the pipeline's denoiser is a "
                            f"{type(denoiser).__name__}")
    for key, value in model_config["config"].items():
        theirs = denoiser.config.get(key)
        if key in denoiser.config and json.dumps(theirs, default=str) != json.dumps(value, default=str):
            raise BadInputError(f"{path} was exported from a {model_config['class']} with {key}={value!r}; the "
                                f"pipeline's has {key}={theirs!r} (another model)")


def recorded_base(metadata: dict) -> str:
    """The base model an export records (older exports: the recipe's model as typed)."""
    return str(metadata.get("base_model") or metadata["recipe"]["model"])


def load_quantized_pipeline(path: Path | str, device: str = "cpu", base: str | Path | None = None):
    """The whole pipeline of an export: the base model (``base``: a local diffusers directory or Hub id; by
    default the one the export records — an absolute path, a Hub id or a built-in tiny model) with the
    quantized denoiser in place of the 16-bit one, which is never loaded.

    Raises:
        BadInputError: the base model is a directory that is not there (moved, or quantized on another
            machine): pass ``base``.
    """
    metadata = read_metadata(Path(path))
    recipe = metadata["recipe"]
    model = str(base) if base is not None else recorded_base(metadata)
    if base is None and Path(model).is_absolute() and not Path(model).exists():
        raise BadInputError(f"{path} was quantized from {model}, which is not here; pass base= the model's "
                            "diffusers directory or Hub id")
    adapter = adapter_of(recipe["family"], model, recipe.get("pipeline_args"))
    denoiser = load_quantized(path, device=device)
    return load_pipeline(model, adapter, getattr(torch, recipe["dtype"]), device, denoiser=denoiser)
