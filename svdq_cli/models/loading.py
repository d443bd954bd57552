"""Loading the 16-bit pipeline: a built-in tiny model, a local diffusers directory, or a Hub repo id."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..errors import BadInputError, SvdqError, gist, missing_library
from ..system import online
from . import generic
from .base import Adapter
from .registry import ADAPTERS, TINY_MODELS, get_adapter
from .streaming import (
    check_weights_match,
    component_checkpoint,
    component_config,
    denoiser_component,
    pipeline_index,
)

PIPELINE_FAMILIES = {
    "FluxPipeline": "flux-dev", "PixArtSigmaPipeline": "pixart-sigma", "SanaPipeline": "sana",
    "StableDiffusion3Pipeline": "sd3", "DiTPipeline": "dit",
}


def adapter_of(family: str, model: str | None = None, pipeline_args: dict | None = None) -> Adapter:
    """The adapter of a run: ``family``'s preset, or (``diffusers``) the one read from ``model``'s pipeline;
    ``pipeline_args`` (a recipe's) are added to every pipeline call.

    Raises:
        BadInputError: an unknown family, or the generic one without a diffusers directory or Hub id.
        ModelFetchError: a Hub id that cannot be fetched.
    """
    if family == generic.FAMILY:
        if not model or model in TINY_MODELS:
            raise BadInputError(f"the {generic.FAMILY} recipe reads the pipeline of the model it is given: "
                                f"svdq quantize DIR --recipe {generic.FAMILY} (a diffusers directory or Hub id)")
        adapter = generic.read_adapter(Path(model_directory(model)).resolve())
    else:
        adapter = get_adapter(family)
    if pipeline_args:
        adapter = replace(adapter, protocol=replace(adapter.protocol, extra={**adapter.protocol.extra,
                                                                             **pipeline_args}))
    return adapter


class ModelFetchError(SvdqError):
    """The model could not be fetched from the Hub."""


def family_of_directory(path: Path) -> str:
    """The adapter family of a local diffusers directory, from its ``model_index.json``: a preset's, else the
    generic adapter's (which says in one line what it cannot drive)."""
    return PIPELINE_FAMILIES.get(pipeline_index(path)["_class_name"], generic.FAMILY)


def resolution_of_directory(path: Path) -> int | None:
    """The resolution the model in a diffusers directory was built for (None when its configs do not say, or
    the directory holds only its ``model_index.json``)."""
    component = denoiser_component(pipeline_index(path))
    try:
        return generic.native_resolution(path, component_config(path, component)) if component else None
    except BadInputError:  # no denoiser config here (a Hub id's index fetched alone)
        return None


def model_directory(model: str) -> Path | None:
    """The local diffusers directory of ``model``: the path itself, or the Hub snapshot (fetched when the Hub
    is reachable, else from the local cache); None for a built-in tiny model, which lives in memory.

    Raises:
        ModelFetchError: a Hub id that cannot be fetched (offline and not cached, gated, missing).
    """
    if model in TINY_MODELS:
        return None
    if Path(model).exists():
        return Path(model)
    import diffusers

    try:
        return Path(diffusers.DiffusionPipeline.download(model, local_files_only=not online.hub_reachable()))
    except Exception as error:  # huggingface_hub raises many types: offline, gated, not found
        raise ModelFetchError(
            f"could not fetch {model} from the Hugging Face Hub ({type(error).__name__}); download it with "
            f"`hf download {model} --local-dir DIR` and pass DIR as the model"
        ) from None


def load_pipeline(model: str, adapter: Adapter, dtype: torch.dtype, device: str = "cpu", offload: bool = False,
                  denoiser=None, without: tuple[str, ...] = ()):
    """The 16-bit pipeline for ``model``, with progress bars off, on ``device`` (or CPU-offloaded).

    ``denoiser`` replaces the checkpoint's (a streamed or quantized one, left where it is); ``without``
    names components not to load: the denoiser's (``adapter.denoiser``), or ``text_encoders`` (all of them:
    prompts are then encoded beforehand, see :mod:`.text_first`).

    Raises:
        ModelFetchError: a Hub id that cannot be fetched (offline, gated, missing).
        BadInputError: a local directory that is not a loadable pipeline of the family.
    """
    if model in TINY_MODELS:
        pipeline = ADAPTERS[model].build_tiny(0, dtype)
        if denoiser is not None:
            setattr(pipeline, adapter.denoiser, denoiser)
    else:
        import diffusers

        directory = model_directory(model)
        check_pipeline_class(directory, adapter)
        pipeline_class = getattr(diffusers, adapter.pipeline_class)
        overrides = {} if denoiser is None else {adapter.denoiser: denoiser}
        for name in without:
            overrides.update(dict.fromkeys(text_encoder_names(directory) if name == "text_encoders" else [name]))
        try:
            pipeline = pipeline_class.from_pretrained(directory, dtype=dtype, local_files_only=True, **overrides)
        except Exception as error:  # diffusers, transformers and safetensors raise many types for bad files
            raise BadInputError(f"cannot load {model} as a {adapter.pipeline_class} ({type(error).__name__}: "
                                f"{gist(error, 160)}){install_hint(error)}") from None
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module) and component is not denoiser:
                _into_fresh_memory(component)
        if denoiser is None and adapter.denoiser not in without:
            check_weights_match_config(directory, adapter.denoiser, adapter.denoiser_of(pipeline))
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipeline.set_progress_bar_config(disable=True)
    if offload and device.startswith("cuda"):
        pipeline.enable_model_cpu_offload(device=device)
    else:
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module) and component is not denoiser:
                component.to(device)
    return pipeline


def install_hint(error: Exception) -> str:
    """"; pip install X" when a component needs a library that is not installed, else nothing."""
    name = missing_library(error)
    return f"; pip install {name}" if name else ""


@torch.no_grad()
def _into_fresh_memory(module: torch.nn.Module) -> None:
    """Every tensor copied out of the file mapping it was loaded on, whose 8-byte alignment would make the CPU
    kernels' results depend on the file layout. (``low_cpu_mem_usage=False`` did the same, but transformers
    refuses it for models that keep modules in float32, such as Wan's UMT5.)"""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()


def check_pipeline_class(directory: Path, adapter: Adapter) -> None:
    """A recipe forced onto another pipeline (a FluxKontextPipeline read as a FluxPipeline) would load the
    components it knows and silently drive the wrong call convention.

    Raises:
        BadInputError: the directory's pipeline class is not the adapter's.
    """
    try:
        found = pipeline_index(directory)["_class_name"]
    except BadInputError:
        return  # load_pipeline's own error names what is wrong with the directory
    if found and found != adapter.pipeline_class:
        raise BadInputError(f"{directory} is a {found}; the {adapter.family} recipe drives a {adapter.pipeline_class}. "
                            f"Leave --recipe out (or use --recipe {generic.FAMILY}) to drive the {found} itself")


def text_encoder_names(directory: Path) -> list[str]:
    """The pipeline's text encoder components (``text_encoder``, ``text_encoder_2``…), from model_index.json."""
    return [name for name in pipeline_index(directory) if name.startswith("text_encoder")]


def check_weights_match_config(model_dir: Path, component: str, model: torch.nn.Module) -> None:
    """A component's safetensors weights hold exactly the tensors its config describes (see
    :func:`.streaming.check_weights_match`); other weight formats are not checked."""
    if any((Path(model_dir) / component).glob("*.safetensors")):
        check_weights_match(component_checkpoint(model_dir, component), model.state_dict())
