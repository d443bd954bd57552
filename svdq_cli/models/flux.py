"""FLUX.1 (dev, schnell): 19 double-stream + 38 single-stream blocks at full size."""

from __future__ import annotations

from functools import partial

import torch

from . import tiny
from .base import Adapter, Protocol


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32, blocks: tuple[int, int] = (2, 4)):
    """A FluxPipeline with 128-wide blocks (``blocks`` = double, single), 16-channel packed latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with tiny.seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=blocks[0], num_single_layers=blocks[1], attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12),
        )
        pipeline = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=tiny.kl_vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5),
            text_encoder=tiny.clip_text_encoder(), tokenizer=tiny.tokenizer(77),
            text_encoder_2=tiny.t5_text_encoder(), tokenizer_2=tiny.tokenizer(64), transformer=transformer,
        )
    generator = torch.Generator().manual_seed(seed + 1)
    for block in transformer.transformer_blocks:
        channels, gains = tiny.outlier_channels(transformer.inner_dim, generator)
        tiny.plant_modulation_outliers(block.norm1.linear, 6, (1, 4), channels, gains)  # scale_msa, scale_mlp
    for block in transformer.single_transformer_blocks:
        channels, gains = tiny.outlier_channels(transformer.inner_dim, generator)
        tiny.plant_modulation_outliers(block.norm.linear, 3, (1,), channels, gains)
    return tiny.finish(pipeline, dtype)


def _adapter(family: str, protocol: Protocol, build=build_tiny) -> Adapter:
    return Adapter(
        family=family,
        pipeline_class="FluxPipeline",
        denoiser_class="FluxTransformer2DModel",
        protocol=protocol,
        build_tiny=build,
        latent_patch=2,  # Flux packs 2×2 latent pixels into a token
        guidance_distilled=True,
    )


FLUX_DEV = _adapter("flux-dev", Protocol(steps=50, guidance=3.5, resolution=1024, extra={"max_sequence_length": 512}))
FLUX_SCHNELL = _adapter("flux-schnell", Protocol(steps=4, guidance=0.0, resolution=1024,
                                                 extra={"max_sequence_length": 256}))
TINY = _adapter("tiny-flux", Protocol(steps=4, guidance=3.5, resolution=64, extra={"max_sequence_length": 32}))
# Four times the blocks of tiny-flux: shows that memory follows the block size, not the model size.
TINY_DEEP = _adapter("tiny-flux-deep", TINY.protocol, partial(build_tiny, blocks=(8, 16)))
