"""``svdq export RUN --format diffusers``: the run's export as a diffusers pipeline directory whose denoiser
loads through diffusers' ``NunchakuLiteQuantizer`` (:mod:`.lite` says what each layer becomes).

Layout under the run: ``export/diffusers/`` holds ``model_index.json`` and every component of the base
pipeline, hard-linked (copied across file systems) from its directory, except the denoiser's folder, which
holds ``config.json`` (the model's config and its ``quantization_config``) and the sharded safetensors.
Every file is an export artifact with its checksum in the manifest. The svdq export is read layer by layer
and each shard written tensor by tensor, so what is resident is one layer and its shard's header.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ...errors import BadInputError
from ...models.loading import adapter_of, load_pipeline, model_directory
from ...models.registry import TINY_MODELS
from ...models.streaming import empty_model
from ...runtime.linear import SVDQLinear
from ...system.files import file_layout
from ...system.progress import task, warn
from ..svdq_file import read_metadata, recorded_base
from . import lite
from .export import verified_export
from .lite_card import card

__all__ = ["ROOT", "SUMMARY", "check_run", "export_run"]

ROOT = "export/diffusers"
SUMMARY = "svdq_export.json"  # what the export did, for push-to-hub's card
MAX_SHARD_BYTES = 1 << 30  # files a broken download re-fetches cheaply; memory is one layer whatever the size


def check_run(config: dict) -> None:
    """Refuse, before any stage runs, a resolved recipe whose export the Lite format cannot hold."""
    reason = lite.unsupported(config)
    if reason:
        raise BadInputError(reason)


@dataclass
class _Item:
    """A run of tensors written together: one quantized layer (converted on the way) or one 16-bit tensor."""

    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    layer: str | None = None  # the quantized layer's name, else a pass-through tensor

    @property
    def bytes(self) -> int:
        return sum(dtype.itemsize * math.prod(shape) for dtype, shape in self.layout.values())


def export_run(run, pipeline: bool = True, force: bool = False, base: str | None = None) -> dict[str, object]:
    """Write ``export/diffusers/`` from the run's verified svdq export; returns what was written."""
    source = verified_export(run)
    metadata = read_metadata(source)
    recipe = metadata["recipe"]
    check_run(recipe)
    _check_validation(run, force)
    dtype = getattr(torch, recipe["dtype"])
    component = metadata["model_config"].get("component", "transformer")
    header = file_layout(source)
    layers = metadata["layers"]
    ranks = {name: header[f"{name}.lora_down"][1][0] for name in layers if f"{name}.lora_down" in header}
    targets, rank = lite.plan(layers, ranks)
    model = _empty_denoiser(metadata, dtype)
    items = _items(header, layers, targets, rank, model, recipe["quant"]["precision"], dtype)
    _check_keys(model, targets, items)
    quantization = targets.quantization_config(recipe["quant"]["precision"], rank, dtype)
    earlier = {relative for relative in run.stage("export")["artifacts"] if relative.startswith(f"{ROOT}/")}
    written: list[str] = []
    errors = _write_model(run, source, header, layers, items, rank, dtype, f"{ROOT}/{component}", written)
    run.write_file("export", f"{ROOT}/{component}/config.json",
                   lite.config_bytes(lite.model_config(metadata, quantization)))
    written.append(f"{ROOT}/{component}/config.json")
    if pipeline:
        written += _link_pipeline(run, base or recorded_base(metadata), recipe, component,
                                  metadata["model_config"]["class"])
    summary = {"directory": ROOT, "component": component, "pipeline": pipeline, "rank": rank,
               "w4a4_layers": len(targets.w4a4), "w4a16_layers": len(targets.w4a16),
               "dense_layers": targets.dense, "w4a16_relative_error_max": max(errors.values(), default=0.0),
               "act_range": recipe["quant"].get("act_range", "svdq")}
    for relative, data in ((f"{ROOT}/{SUMMARY}", lite.config_bytes(summary)),
                           (f"{ROOT}/README.md", card(metadata, summary).encode())):
        run.write_file("export", relative, data)
        written.append(relative)
    for stale in sorted(earlier - set(written)):
        run.discard("export", stale)
    for name, reason in targets.dense.items():
        warn(f"diffusers: {name} stays 16-bit ({reason})")
    if summary["act_range"] != "nunchaku":
        warn("diffusers: this run was validated with svdq's activation rule; the Lite kernels quantize "
             "activations as Nunchaku does (max|x|/7, all signed): quantize with --act-range nunchaku for a "
             "checkpoint whose validation is what runs")
    return {**summary, "files": len(written), "bytes": sum((run.path / f).stat().st_size for f in written)}


def _check_validation(run, force: bool) -> None:
    validate = run.stage("validate")
    if validate.get("status") == "done" and not validate.get("passed", False) and not force:
        raise BadInputError(f"{run.path} failed its validation gates; fix the run or pass --force to export it "
                            "anyway")


def _empty_denoiser(metadata: dict, dtype: torch.dtype) -> torch.nn.Module:
    import diffusers

    config = metadata["model_config"]
    return empty_model(getattr(diffusers, config["class"]), config["config"], dtype)


def _items(header, layers, targets: lite.Targets, rank: int, model, precision: str, dtype) -> list[_Item]:
    """Every tensor of the Lite checkpoint, grouped by what produces it, in name order."""
    kinds = {**dict.fromkeys(targets.w4a4, "w4a4"), **dict.fromkeys(targets.w4a16, "w4a16"),
             **dict.fromkeys(targets.dense, "dense")}
    items = [_Item(lite.tensor_layout(name, facts, kinds[name], rank, _has_bias(model, name), precision, dtype),
                   name) for name, facts in layers.items()]
    items += [_Item({key: value}) for key, value in header.items() if key.rpartition(".")[0] not in layers]
    return sorted(items, key=lambda item: next(iter(item.layout)))


def _has_bias(model, name: str) -> bool:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise BadInputError(f"the export's layer {name} is not a module of {type(model).__name__}") from None
    return getattr(module, "bias", None) is not None


def _check_keys(model, targets: lite.Targets, items: list[_Item]) -> None:
    """The checkpoint's keys must be exactly those of the model diffusers patches (it refuses any other): the
    model's own, less each target's weight and bias, which its Lite module's tensors replace."""
    quantized = set(targets.w4a4) | set(targets.w4a16)
    if not quantized:
        raise BadInputError("the export has no quantized layer the Lite format can hold")
    replaced = {f"{name}.{key}" for name in quantized for key in ("weight", "bias")}
    expected = {key for key in model.state_dict() if key not in replaced}
    plain = {key for item in items if item.layer not in quantized for key in item.layout}
    missing, unexpected = sorted(expected - plain), sorted(plain - expected)
    if missing or unexpected:
        raise BadInputError(f"the export does not fit {type(model).__name__}'s state dict (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]})")


def _write_model(run, source: Path, header, layers, items: list[_Item], rank: int, dtype, folder: str,
                 written: list[str]) -> dict[str, float]:
    """The shards and their index; returns each re-quantized W4A16 layer's relative error."""
    shards = _shards(items)
    names = [f"{lite.WEIGHTS_NAME}.safetensors"] if len(shards) == 1 else [
        f"{lite.WEIGHTS_NAME}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    errors: dict[str, float] = {}
    owned: dict[str, list[str]] = {}
    for key in header:
        owned.setdefault(key.rpartition(".")[0], []).append(key)
    with task("diffusers", len(shards)) as advance:
        for shard, name in zip(shards, names, strict=True):
            shard_layout = {key: value for item in shard for key, value in item.layout.items()}
            # the source is mapped anew per shard: the pages read stay resident while it is open
            with safe_open(str(source), "pt") as handle, \
                    run.writer("export", f"{folder}/{name}", shard_layout, {"format": "pt"}) as out:
                for item in shard:
                    for key, tensor in _produce(handle, owned, layers, item, rank, dtype, errors).items():
                        out.write(key, tensor)
            written.append(f"{folder}/{name}")
            advance(name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(item.bytes for item in items)},
                 "weight_map": {key: name for shard, name in zip(shards, names, strict=True)
                                for item in shard for key in item.layout}}
        relative = f"{folder}/{lite.WEIGHTS_NAME}.safetensors.index.json"
        run.write_file("export", relative, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        written.append(relative)
    return errors


def _shards(items: list[_Item]) -> list[list[_Item]]:
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.bytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.bytes
    return shards


def _produce(handle, owned, layers, item: _Item, rank: int, dtype, errors: dict[str, float]
             ) -> dict[str, torch.Tensor]:
    """The item's tensors in its layout's order (``owned``: the export's keys by owning module)."""
    if item.layer is None:
        return {key: handle.get_tensor(key) for key in item.layout}
    name = item.layer
    own = {key[len(name) + 1:]: handle.get_tensor(key) for key in owned[name]}
    layer = SVDQLinear.from_state_dict(own, layers[name])
    has_bias = f"{name}.bias" in item.layout
    converted = lite.convert_layer(layer, rank, has_bias, dtype)
    if converted.kind == "w4a16" and converted.error:
        errors[name] = converted.error
    tensors = {f"{name}.{key}": value for key, value in converted.tensors.items()}
    return {key: tensors[key].contiguous() for key in item.layout}


def _link_pipeline(run, model: str, recipe: dict, component: str, denoiser_class: str) -> list[str]:
    """model_index.json and every other component of the base pipeline, beside the quantized denoiser."""
    if model in TINY_MODELS:
        with tempfile.TemporaryDirectory(dir=run.path) as scratch:
            adapter = adapter_of(recipe["family"], model, recipe.get("pipeline_args"))
            built = load_pipeline(model, adapter, getattr(torch, recipe["dtype"]))
            setattr(built, component, None)
            built.save_pretrained(scratch)
            return _link_components(run, Path(scratch), component, denoiser_class)
    directory = model_directory(model)
    if directory is None or not (Path(directory) / "model_index.json").is_file():
        raise BadInputError(f"the base model {model} is not a diffusers directory here; pass --base DIR (its "
                            "pipeline) or --no-pipeline for the denoiser alone")
    return _link_components(run, Path(directory), component, denoiser_class)


def _link_components(run, directory: Path, component: str, denoiser_class: str) -> list[str]:
    index = json.loads((directory / "model_index.json").read_text())
    written = [f"{ROOT}/model_index.json"]
    index[component] = ["diffusers", denoiser_class]
    run.write_file("export", written[0], (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    for name, entry in sorted(index.items()):
        if name.startswith("_") or name == component or not isinstance(entry, list) or entry[0] is None:
            continue
        folder = directory / name
        for path in sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []:
            relative = f"{ROOT}/{name}/{path.relative_to(folder).as_posix()}"
            run.link_file("export", relative, path.resolve())
            written.append(relative)
    return written
