"""Model adapters: how to run a family's pipeline (DESIGN.md §6).

An adapter is data: the pipeline and denoiser classes, the published generation protocol, how the call
convention differs (guidance as an input, class labels instead of text) and a builder for a tiny offline
model. What to quantize is not here: :mod:`.discovery` finds it in the model itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..calibration.prompts import Prompt
from ..errors import BadInputError
from .discovery import Layout, discover
from .resolution import Resolution, dimensions, of


@dataclass(frozen=True)
class Protocol:
    """How the family's pipeline is called: steps, guidance, resolution and extra keyword arguments."""

    steps: int
    guidance: float
    resolution: Resolution
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    """Everything svdq needs to know about one model family."""

    family: str
    pipeline_class: str
    denoiser_class: str
    protocol: Protocol
    build_tiny: Callable[..., object]
    denoiser: str = "transformer"  # the pipeline component svdq quantizes (``unet`` for a UNet)
    latent_patch: int | None = None  # latent pixels per token side; None: the denoiser's patch_size
    guidance_distilled: bool = False  # guidance is an input (Flux): one transformer pass a step, not two
    text_conditioned: bool = True  # prompts are text the pipeline encodes (DiT's are class labels)

    def denoiser_of(self, pipeline):
        """The pipeline's denoiser module (its transformer or UNet)."""
        return getattr(pipeline, self.denoiser)

    def passes_per_step(self, guidance: float) -> int:
        """Transformer passes a denoising step makes: two with classifier-free guidance."""
        return 1 if self.guidance_distilled or guidance <= 1.0 else 2

    def resolution_multiple(self, pipeline) -> int:
        """Image sizes the pipeline can take are multiples of this: VAE downsampling × latent patch."""
        patch = self.latent_patch or self.denoiser_of(pipeline).config.get("patch_size", 1) or 1
        scale = getattr(pipeline, "vae_scale_factor", None) or getattr(pipeline, "vae_scale_factor_spatial", 8)  # Wan's
        return scale * patch

    def resolution_error(self, pipeline, resolution: Resolution, flag: str) -> str | None:
        """Why the pipeline cannot generate at ``resolution`` (``flag`` names the option), or None."""
        multiple, sides = self.resolution_multiple(pipeline), dimensions(resolution)
        if any(side % multiple for side in sides):
            return (f"{flag} {resolution} is not a multiple of {multiple} (the model's VAE and patch size); try "
                    f"{of(*(max(multiple, side // multiple * multiple) for side in sides))}")
        positions = self.denoiser_of(pipeline).config.get("pos_embed_max_size")  # SD3: a fixed table of positions
        if positions and max(sides) > positions * multiple:
            return (f"{flag} {resolution} exceeds the {positions * multiple} px its position embedding covers "
                    f"(pos_embed_max_size {positions})")
        return None

    def tokens(self, pipeline, resolution: Resolution) -> int:
        """Latent tokens of one generation at ``resolution`` (a video's: of every latent frame)."""
        multiple, (width, height) = self.resolution_multiple(pipeline), dimensions(resolution)
        return (width // multiple) * (height // multiple) * self.latent_frames(pipeline)

    def latent_frames(self, pipeline) -> int:
        return 1

    def activation_bytes(self, pipeline, resolution: Resolution, widest: int, element_size: int) -> tuple[int, str]:
        """An estimate of the largest activations one generation at ``resolution`` holds at once, and where:
        a denoiser pass (tokens × the widest linear output, a few such tensors live) or the VAE decoder at
        full resolution (its first-level channels). A bound for refusing the impossible, not a prediction."""
        live = 4  # input, output and the intermediates of one layer
        denoiser = self.tokens(pipeline, resolution) * widest * element_size * live
        vae = getattr(pipeline, "vae", None)
        channels = (getattr(getattr(vae, "config", None), "block_out_channels", None) or [128])[0]
        width, height = dimensions(resolution)
        decoder = width * height * channels * element_size * live
        return max((denoiser, "a denoiser pass"), (decoder, "the VAE decoder"))

    def discover(self, pipeline, prompt: str = "a photo of a cat") -> Layout:
        """What to quantize in ``pipeline``'s denoiser, traced from its first call generating ``prompt``."""
        protocol, denoiser = self.protocol, self.denoiser_of(pipeline)
        return discover(denoiser, lambda: self.generate(
            pipeline, [prompt], [0], protocol.steps, protocol.guidance, protocol.resolution, output_type="latent"),
            denoiser.dtype)

    def refuse_reference_images(self, prompts: list[str]) -> None:
        """A preset's call takes text (or class labels) only.

        Raises:
            BadInputError: a prompt that carries a reference image.
        """
        if any(isinstance(prompt, Prompt) for prompt in prompts):
            raise BadInputError(f"the {self.family} recipe drives {self.pipeline_class}, which takes no reference "
                                "image; prompts with images are for editing pipelines (FLUX.1 Kontext)")

    def generate(
        self,
        pipeline,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance: float,
        resolution: Resolution,
        output_type: str = "pt",
    ) -> torch.Tensor:
        """Run the pipeline on ``prompts`` with one seeded generator per prompt; images in [0, 1] or latents.

        Generators live on the CPU, so a seed gives the same noise on any device.
        """
        self.refuse_reference_images(prompts)
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        width, height = dimensions(resolution)
        result = pipeline(
            prompt=prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=generators,
            output_type=output_type,
            **self.protocol.extra,
        )
        return result.images


def frame_strip(frames: torch.Tensor) -> torch.Tensor:
    """Videos ``[B, F, C, H, W]`` as images ``[B, C, H, F·W]``, their frames side by side: every image-side
    stage (metrics over every pixel, the comparison sheet, the caches) then takes a video as it is."""
    b, f, c, h, w = frames.shape
    return frames.permute(0, 2, 3, 1, 4).reshape(b, c, h, f * w)


def strip_frames(strip: torch.Tensor, frame_width: int) -> torch.Tensor:
    """The frames ``[F, C, H, W]`` of one strip ``[1, C, H, F·W]`` (an image is its one frame)."""
    _, c, h, width = strip.shape
    return strip.reshape(c, h, width // frame_width, frame_width).permute(2, 0, 1, 3)


def reference_images(prompts: list[str], resolution: Resolution) -> list | None:
    """The reference images of editing prompts (:class:`..calibration.prompts.Prompt`) at the generation's
    size, or None when no prompt has one.

    Raises:
        BadInputError: a batch that mixes prompts with and without images (svdq generates one at a time).
    """
    with_image = [isinstance(prompt, Prompt) for prompt in prompts]
    if not any(with_image):
        return None
    if not all(with_image):
        raise BadInputError("prompts with and without reference images cannot be generated in one batch")
    return [prompt.reference_image(*dimensions(resolution)) for prompt in prompts]
