"""DiT (Peebles & Xie): class-conditional ImageNet transformers, VQ4DiT's models. DiT-XL/2 has 28 blocks of
self-attention and a GELU MLP, each with its own AdaLN-Zero timestep/label embedding MLP.

A DiT takes class labels, not text, so a "prompt" names a class: an integer label, an ImageNet class name
the pipeline knows (``golden retriever``), or any other text, which picks a class by a stable hash of it — so
the shipped text prompt sets serve as random class labels (VQ4DiT's zero-data calibration draws random
labels). The resolution is the model's own (``sample_size`` × the VAE's scale); nothing is text-encoded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..errors import BadInputError
from . import tiny
from .base import Adapter, Protocol
from .resolution import Resolution


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32, blocks: int = 3):
    """A DiTPipeline with 128-wide blocks on 4-channel 32×32 latents (64 px images), 1000 classes."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    with tiny.seeded(seed):
        transformer = DiTTransformer2DModel(
            num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=blocks,
            sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
        )
        pipeline = DiTPipeline(transformer=transformer, vae=tiny.kl_vae(4), scheduler=DDIMScheduler(clip_sample=False))
    generator = torch.Generator().manual_seed(seed + 1)
    for block in transformer.transformer_blocks:
        channels, gains = tiny.outlier_channels(transformer.inner_dim, generator)
        tiny.plant_modulation_outliers(block.norm1.linear, 6, (1, 4), channels, gains)  # scale_msa, scale_mlp
    return tiny.finish(pipeline, dtype)


def class_label(prompt: str, pipeline) -> int:
    """The class a prompt names (see the module docstring).

    Raises:
        BadInputError: an integer label outside the model's classes.
    """
    classes = pipeline.transformer.config.num_embeds_ada_norm
    text = prompt.strip()
    if text.lstrip("-").isdigit():
        if not 0 <= int(text) < classes:
            raise BadInputError(f"class label {text} is outside the model's {classes} classes")
        return int(text)
    names = getattr(pipeline, "labels", None) or {}
    if text in names:
        return int(names[text])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % classes


def _vae_scale(pipeline) -> int:
    """Image pixels per latent pixel (DiTPipeline has no ``vae_scale_factor``)."""
    return 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


class _Latents(Exception):
    def __init__(self, latents: torch.Tensor) -> None:
        super().__init__("latents")
        self.latents = latents


@dataclass(frozen=True)
class ClassConditionalAdapter(Adapter):
    """An adapter whose pipeline takes class labels (DiTPipeline) at the model's one resolution."""

    text_conditioned: bool = False

    def native_resolution(self, pipeline) -> int:
        return pipeline.transformer.config.sample_size * _vae_scale(pipeline)

    def resolution_multiple(self, pipeline) -> int:
        return _vae_scale(pipeline) * pipeline.transformer.config.patch_size

    def resolution_error(self, pipeline, resolution: Resolution, flag: str) -> str | None:
        native = self.native_resolution(pipeline)
        if resolution != native:
            return f"{flag} {resolution}: {self.family} generates at its own {native} px only"
        return None

    def generate(self, pipeline, prompts, seeds, steps, guidance, resolution, output_type="pt") -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]``, or the final latents (``output_type="latent"``, decoding skipped)."""
        self.refuse_reference_images(prompts)
        labels = [class_label(prompt, pipeline) for prompt in prompts]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        if output_type != "latent":
            return pipeline(class_labels=labels, guidance_scale=guidance, generator=generators,
                            num_inference_steps=steps, output_type="pt").images
        previous = vars(pipeline.vae).get("decode")  # a recording wrapper validate may have installed

        def stop(latents, *args, **kwargs):
            raise _Latents(latents)

        pipeline.vae.decode = stop
        try:
            pipeline(class_labels=labels, guidance_scale=guidance, generator=generators, num_inference_steps=steps)
        except _Latents as done:
            return done.latents
        finally:
            if previous is None:
                del pipeline.vae.decode  # back to the class's method
            else:
                pipeline.vae.decode = previous
        raise RuntimeError("DiTPipeline finished without decoding latents")


def _adapter(family: str, protocol: Protocol) -> ClassConditionalAdapter:
    return ClassConditionalAdapter(
        family=family, pipeline_class="DiTPipeline", denoiser_class="DiTTransformer2DModel",
        protocol=protocol, build_tiny=build_tiny,
    )


# 50 steps with the checkpoint's scheduler and classifier-free guidance 1.5 (DiT's FID setting); a recipe sets more
# steps for DiT's 250-step protocol.
DIT = _adapter("dit", Protocol(steps=50, guidance=1.5, resolution=256))
TINY = _adapter("tiny-dit", Protocol(steps=4, guidance=1.5, resolution=64))
