"""PixArt-Σ: 28 blocks of self-attention, cross-attention to T5 and a GELU MLP at full size."""

from __future__ import annotations

import torch

from . import tiny
from .base import Adapter, Protocol


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32, blocks: int = 3):
    """A PixArtSigmaPipeline with 128-wide blocks on 4-channel latents."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    with tiny.seeded(seed):
        transformer = PixArtTransformer2DModel(
            sample_size=16, num_layers=blocks, patch_size=2, attention_head_dim=32, num_attention_heads=4,
            in_channels=4, out_channels=8, cross_attention_dim=128, caption_channels=64,
        )
        pipeline = PixArtSigmaPipeline(
            tokenizer=tiny.tokenizer(32), text_encoder=tiny.t5_text_encoder(), vae=tiny.kl_vae(4),
            transformer=transformer, scheduler=DPMSolverMultistepScheduler(),
        )
    generator = torch.Generator().manual_seed(seed + 1)
    for block in transformer.transformer_blocks:
        channels, gains = tiny.outlier_channels(transformer.inner_dim, generator)
        tiny.plant_table_outliers(block.scale_shift_table, (1, 4), channels, gains)
    return tiny.finish(pipeline, dtype)


def _adapter(family: str, protocol: Protocol) -> Adapter:
    return Adapter(
        family=family, pipeline_class="PixArtSigmaPipeline", denoiser_class="PixArtTransformer2DModel",
        protocol=protocol, build_tiny=build_tiny,
    )


# use_resolution_binning off: the pipeline would otherwise generate at its nearest trained size and resize,
# so that --resolution 512 silently ran at 1024 px.
PIXART_SIGMA = _adapter("pixart-sigma", Protocol(steps=20, guidance=4.5, resolution=1024,
                                                extra={"use_resolution_binning": False}))
TINY = _adapter("tiny-pixart", Protocol(steps=4, guidance=4.5, resolution=64,
                                        extra={"use_resolution_binning": False, "max_sequence_length": 32}))
