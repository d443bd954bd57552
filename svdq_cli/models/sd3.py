"""Stable Diffusion 3 (MMDiT): joint blocks with an image and a context stream; the last block's context
stream has no MLP and no output projection (``context_pre_only``)."""

from __future__ import annotations

import torch

from . import tiny
from .base import Adapter, Protocol


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32, blocks: int = 3):
    """A StableDiffusion3Pipeline with 128-wide joint blocks and three tiny text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with tiny.seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=blocks, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
            out_channels=4,
        )
        pipeline = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=tiny.kl_vae(4, shift_factor=0.06, scaling_factor=1.5),
            text_encoder=tiny.clip_text_encoder(with_projection=True), tokenizer=tiny.tokenizer(77),
            text_encoder_2=tiny.clip_text_encoder(with_projection=True), tokenizer_2=tiny.tokenizer(77),
            text_encoder_3=tiny.t5_text_encoder(), tokenizer_3=tiny.tokenizer(32),
        )
    generator = torch.Generator().manual_seed(seed + 1)
    for block in transformer.transformer_blocks:
        channels, gains = tiny.outlier_channels(transformer.inner_dim, generator)
        tiny.plant_modulation_outliers(block.norm1.linear, 6, (1, 4), channels, gains)
    return tiny.finish(pipeline, dtype)


def _adapter(family: str, protocol: Protocol) -> Adapter:
    return Adapter(
        family=family, pipeline_class="StableDiffusion3Pipeline", denoiser_class="SD3Transformer2DModel",
        protocol=protocol, build_tiny=build_tiny,
    )


SD3 = _adapter("sd3", Protocol(steps=28, guidance=7.0, resolution=1024))
TINY = _adapter("tiny-sd3", Protocol(steps=4, guidance=7.0, resolution=64, extra={"max_sequence_length": 32}))
