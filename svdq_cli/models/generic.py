"""Any diffusers pipeline without a preset: the adapter's facts read from the model and the pipeline class.

A preset (``flux``, ``sd3``…) is what svdq was told about a family; this adapter learns the same from the
model directory: the pipeline class from ``model_index.json``, the denoiser (its ``transformer`` or ``unet``
component) and its class, the protocol from the call's own defaults (``num_inference_steps``,
``guidance_scale``) and the configs (resolution: the denoiser's sample size × the VAE's downsampling), and
which keyword arguments the call takes. What to quantize is discovered from a traced call, as for every
family (:mod:`.discovery`). A call it cannot drive is one line: what the call requires beyond a prompt (an
image, class labels) is refused before work starts; a video pipeline (``num_frames``: Wan) returns its
frames side by side, one wide image per prompt, so every frame is validated; a call that fails as driven names the
arguments svdq passed, and a recipe's ``pipeline_args`` supply more.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import BadInputError, SvdqError, gist, missing_library
from .base import Adapter, Protocol, frame_strip, reference_images
from .resolution import dimensions
from .streaming import component_config, denoiser_component, pipeline_index

FAMILY = "diffusers"
CALL = ("prompt", "num_inference_steps", "height", "width", "generator", "output_type")  # what svdq passes
DEFAULT_STEPS = 28
DEFAULT_RESOLUTION = 1024
IMAGE_PROMPTS = ("it takes an image: give it prompts with images (--prompts FILE: a JSON list of "
                 '{"prompt": ..., "image": PATH}, or a CSV with prompt and image columns)')


@dataclass(frozen=True)
class GenericAdapter(Adapter):
    """An adapter whose call passes only the keyword arguments the pipeline's ``__call__`` takes."""

    guidance_argument: bool = True  # the call takes a numeric guidance_scale (Qwen-Image's defaults to None)
    area_argument: bool = False  # the call resizes to max_area (Kontext: 1024² whatever height and width say)
    video: bool = False  # the call generates frames (Wan): they are returned side by side, as one wide image
    default_frames: int = 1  # the call's own num_frames
    image_argument: bool = False  # the call takes a reference image (editing: Kontext, Qwen-Image-Edit)
    resize_argument: bool = False  # the call resizes the reference image to a preferred size by default

    def latent_frames(self, pipeline) -> int:
        """A video's latent frames: the frames asked for (else the call's default), compressed in time by the
        VAE (Wan: 81 frames are 21 latent frames)."""
        if not self.video:
            return 1
        frames = self.protocol.extra.get("num_frames", self.default_frames)
        return (int(frames) - 1) // getattr(pipeline, "vae_scale_factor_temporal", 1) + 1

    def generate(self, pipeline, prompts, seeds, steps, guidance, resolution, output_type="pt") -> torch.Tensor:
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        width, height = dimensions(resolution)
        arguments = {"prompt": prompts, "num_inference_steps": steps, "height": height, "width": width,
                     "generator": generators, "output_type": output_type, **self.protocol.extra}
        if self.guidance_argument:
            arguments["guidance_scale"] = guidance
        if self.area_argument:
            arguments["max_area"] = width * height
        images = reference_images(prompts, resolution)
        if images is not None:
            if not self.image_argument:
                raise BadInputError(f"{self.pipeline_class} takes no reference image; give it text prompts")
            arguments["image"] = images[0] if len(images) == 1 else images
            if self.resize_argument:  # Kontext: keep the size asked, not its preferred ones (672 px and up)
                arguments["_auto_resize"] = False
        try:
            result = pipeline(**arguments)
        except SvdqError:
            raise  # svdq's own, from a hook inside the call: already one line
        except NameError as error:  # diffusers calls an optional library it imports only when installed (ftfy)
            raise BadInputError(f"{self.pipeline_class} needs a library that is not installed ({gist(error)}): "
                                f"pip install {missing_library(error)}") from None
        except (TypeError, ValueError, KeyError, IndexError) as error:  # how a call convention it lacks fails
            shown = ", ".join(sorted(set(arguments) - {"generator", "prompt"}))
            needs = (IMAGE_PROMPTS if self.image_argument and images is None
                     else "give the arguments it needs as the recipe's pipeline_args")
            raise BadInputError(f"{self.pipeline_class} failed when svdq called it with prompt, {shown} "
                                f"({type(error).__name__}: {gist(error, 160)}); {needs}") from None
        if not self.video:
            return result.images
        return result.frames if output_type == "latent" else frame_strip(result.frames)


@lru_cache(maxsize=8)
def read_adapter(directory: Path) -> GenericAdapter:
    """The adapter of the diffusers pipeline saved in ``directory``.

    Raises:
        BadInputError: not a pipeline directory, a class the installed diffusers lacks, no transformer or
            UNet, or a call svdq cannot drive (what is missing is named).
    """
    import diffusers

    index = pipeline_index(directory)
    name = index["_class_name"]
    pipeline_class = getattr(diffusers, str(name), None)
    if not isinstance(pipeline_class, type):
        raise BadInputError(f"{directory}: pipeline {name} is not a class of the installed diffusers "
                            f"{diffusers.__version__}; upgrade diffusers")
    component = denoiser_component(index)
    if component is None:
        raise BadInputError(f"{directory}: {name} has no transformer or unet component; svdq quantizes a "
                            "pipeline's denoiser")
    parameters = inspect.signature(pipeline_class.__call__).parameters
    _check_call(name, parameters, pipeline_class)
    config = component_config(directory, component)
    return GenericAdapter(
        family=FAMILY, pipeline_class=name, denoiser_class=index[component][1], denoiser=component,
        protocol=_protocol(directory, parameters, config), build_tiny=None,
        latent_patch=_latent_patch(component, config),
        guidance_distilled=bool(config.get("guidance_embeds")),
        guidance_argument=isinstance(_default(parameters, "guidance_scale"), (int, float)),
        area_argument="max_area" in parameters,
        video="num_frames" in parameters,
        default_frames=int(_default(parameters, "num_frames") or 1),
        image_argument="image" in parameters,
        resize_argument="_auto_resize" in parameters,
    )


def _check_call(name: str, parameters, pipeline_class) -> None:
    missing = [p for p in CALL if p not in parameters]
    if missing:
        raise BadInputError(f"{name}'s call takes no {', '.join(missing)}: svdq drives text-to-image calls "
                            f"({', '.join(CALL)}); this pipeline needs a preset")
    required = [p for p, spec in parameters.items() if p not in ("self", *CALL) and spec.default is spec.empty
                and spec.kind not in (spec.VAR_POSITIONAL, spec.VAR_KEYWORD)]
    if required:
        raise BadInputError(f"{name}'s call requires {', '.join(required)}, which svdq's calibration prompts do "
                            "not carry; this pipeline needs a preset")
    if not callable(getattr(pipeline_class, "encode_prompt", None)):
        raise BadInputError(f"{name} has no encode_prompt, which svdq records to encode each prompt once")


def _latent_patch(component: str, config: dict) -> int:
    """Latent pixels per token side. A UNet's attention sees every latent pixel at its first level (and
    diffusers' UNets pad sizes their downsampling does not divide). Flux-style transformers pack 2×2 latent
    pixels into a token with patch_size 1 in the config: asking for 2 refuses only sizes that a true 1-patch
    model could also take."""
    if component == "unet":
        return 1
    patch = config.get("patch_size") or 1
    return max(2, int(patch[-1] if isinstance(patch, (list, tuple)) else patch))  # Wan's: (frames, height, width)


def _protocol(directory: Path, parameters, denoiser: dict) -> Protocol:
    """The call's own defaults; the resolution the model was built for (its sample size in latent pixels)."""
    steps, guidance = _default(parameters, "num_inference_steps"), _default(parameters, "guidance_scale")
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in parameters else {}
    return Protocol(steps=steps if isinstance(steps, int) and steps > 0 else DEFAULT_STEPS,
                    guidance=float(guidance) if isinstance(guidance, (int, float)) else 0.0,
                    resolution=native_resolution(directory, denoiser) or DEFAULT_RESOLUTION, extra=extra)


def native_resolution(directory: Path, denoiser: dict) -> int | None:
    """The resolution a model was built for: its denoiser's sample size (in latent pixels) times the VAE's
    downsampling; None when the configs do not say."""
    sample, factor = denoiser.get("sample_size"), _vae_factor(directory)
    return sample * factor if isinstance(sample, int) and factor else None


def _default(parameters, name: str):
    return parameters[name].default if name in parameters else None


def _vae_factor(directory: Path) -> int | None:
    """Pixels per latent pixel, from the VAE's config: one halving per level after the first."""
    try:
        config = component_config(directory, "vae")
    except BadInputError:  # no VAE config: the default resolution
        return None
    if isinstance(config.get("scale_factor_spatial"), int):  # Wan's VAE says it
        return config["scale_factor_spatial"]
    for key in ("block_out_channels", "encoder_block_out_channels"):
        if isinstance(config.get(key), list) and config[key]:
            return 2 ** (len(config[key]) - 1)
    if isinstance(config.get("temperal_downsample"), list):  # Wan / Qwen-Image VAEs (diffusers' spelling)
        return 2 ** len(config["temperal_downsample"])
    return None

