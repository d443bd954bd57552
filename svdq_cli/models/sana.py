"""Sana: linear-attention DiT; its MLP is convolutional (GLUMBConv), so discovery finds linears in the attention
only."""

from __future__ import annotations

import torch

from . import tiny
from .base import Adapter, Protocol


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32, blocks: int = 3):
    """A SanaPipeline with 128-wide blocks, a tiny Gemma-2 text encoder and a tiny DC-AE."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    with tiny.seeded(seed):
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=32, num_layers=blocks,
            num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128, caption_channels=64,
            sample_size=32, patch_size=1,
        )
        text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=len(tiny.vocabulary()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=3,
        ))
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
            decoder_block_types="ResBlock", encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 32),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
            decoder_qkv_multiscales=((), ()), decoder_norm_types="rms_norm", decoder_act_fns="silu",
        )
        pipeline = SanaPipeline(
            tokenizer=tiny.tokenizer(32), text_encoder=text_encoder, vae=vae, transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
        )
    generator = torch.Generator().manual_seed(seed + 1)
    for block in transformer.transformer_blocks:
        channels, gains = tiny.outlier_channels(transformer.config.num_attention_heads * 32, generator)
        tiny.plant_table_outliers(block.scale_shift_table, (1, 4), channels, gains)
    return tiny.finish(pipeline, dtype)


def _adapter(family: str, protocol: Protocol) -> Adapter:
    return Adapter(
        family=family, pipeline_class="SanaPipeline", denoiser_class="SanaTransformer2DModel",
        protocol=protocol, build_tiny=build_tiny,
    )


# use_resolution_binning off: the pipeline would otherwise generate at its nearest trained size and resize.
SANA = _adapter("sana", Protocol(steps=20, guidance=4.5, resolution=1024, extra={"use_resolution_binning": False}))
TINY = _adapter("tiny-sana", Protocol(steps=4, guidance=4.5, resolution=64, extra={
    "use_resolution_binning": False, "max_sequence_length": 32, "complex_human_instruction": None}))
