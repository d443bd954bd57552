"""Real-size pipelines on disk with random weights: real widths and block counts, fake values.

No model can be downloaded here, yet memory and time at full size are part of svdq working. These write a
diffusers directory whose denoiser has the real model's exact configuration, its checkpoint sharded as
diffusers shards it, with deterministic random weights:

- FLUX.1-dev: hidden 3072, 24 heads, 19 double- and 38 single-stream blocks by default (11.9 B parameters,
  23.8 GB in bf16), with the AdaLN outliers real DiTs have;
- SDXL 1.0 base: its UNet (2.6 B parameters, 5.1 GB in bf16).

The text encoders and VAE are tiny ones of the right output widths (FLUX: T5 4096, CLIP 768, 16 latent
channels; SDXL: CLIP 768 and 1280 with a 1280 projection, 4 latent channels; both 8× downsampling), so
prompts, latents and token counts are the real model's. The denoiser is written tensor by tensor: building
even the full-size checkpoint needs one tensor's memory.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

from ..system.files import TensorFileWriter
from . import tiny
from .streaming import empty_model

FLUX_DEV_CONFIG = {
    "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
    "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56],
}
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the defaults it leaves out are diffusers' own)
SDXL_UNET_CONFIG = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True, "norm_num_groups": 32,
}
SHARD_BYTES = 5 << 30  # diffusers' default shard size
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear")
SCALE_CHUNKS = {"norm1.linear": (6, (1, 4)), "norm1_context.linear": (6, (1, 4)), "norm.linear": (3, (1,))}


def write_flux_shaped(directory: Path, double: int = 19, single: int = 38, seed: int = 0) -> int:
    """Write the pipeline to ``directory``; returns the transformer checkpoint's size in bytes."""
    from diffusers import FluxTransformer2DModel

    directory = Path(directory)
    _write_small_components(directory, seed)
    config = {**FLUX_DEV_CONFIG, "num_layers": double, "num_single_layers": single}
    return write_component(directory / "transformer", FluxTransformer2DModel, config,
                           lambda name, shape: _weight(name, shape, seed))


def write_sdxl_shaped(directory: Path, seed: int = 0) -> int:
    """Write an SDXL-base-shaped pipeline to ``directory``; returns the UNet checkpoint's size in bytes."""
    from diffusers import UNet2DConditionModel

    directory = Path(directory)
    _write_small_sdxl_components(directory, seed)
    return write_component(directory / "unet", UNet2DConditionModel, SDXL_UNET_CONFIG,
                           lambda name, shape: _weight(name, shape, seed))


def write_component(target: Path, model_class, config: dict, weight) -> int:
    """Write ``model_class(**config)``'s checkpoint to ``target`` tensor by tensor (``weight(name, shape)``
    gives each), sharded as diffusers shards it, with its config; returns the checkpoint's size in bytes."""
    target.mkdir(parents=True, exist_ok=True)
    layout = {name: (t.dtype, tuple(t.shape)) for name, t in
              empty_model(model_class, config, torch.bfloat16).state_dict().items()}
    shards, current, size = [], {}, 0
    for name, (dtype, shape) in layout.items():  # model order: the embedders, then block after block
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = (dtype, shape), size + nbytes
    shards.append(current)
    for old in target.glob("diffusion_pytorch_model*"):
        old.unlink()
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        file = f"diffusion_pytorch_model-{number:05d}-of-{len(shards):05d}.safetensors"
        with TensorFileWriter(target / file, shard, {"format": "pt"}) as writer:
            for name, (dtype, shape) in shard.items():
                writer.write(name, weight(name, shape).to(dtype))
                weight_map[name] = file
            writer.close()
        total += (target / file).stat().st_size
    (target / "config.json").write_text(json.dumps({"_class_name": model_class.__name__, **config}, indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _weight(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A deterministic tensor for ``name``: linear and convolution weights ~ N(0, 1/fan_in) (modulation ones
    ×0.1), small biases, unit norm gains, and on the AdaLN scale biases of every block three channels raised
    by 20–50 (FLUX's names; a UNet has none)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed * 1_000_003)
    module = name.rpartition(".")[0]
    if len(shape) == 1 and name.endswith(".weight"):  # norm gains
        return torch.ones(shape)
    if len(shape) == 1:
        bias = torch.randn(shape, generator=generator) * 0.02
        relative = module.split(".", 2)[-1] if module.count(".") >= 2 else module
        if relative in SCALE_CHUNKS:
            chunks, scale_chunks = SCALE_CHUNKS[relative]
            channels, gains = tiny.outlier_channels(shape[0] // chunks, generator)
            for chunk in scale_chunks:
                bias[chunk * (shape[0] // chunks) + channels] += gains
        return bias
    weight = torch.randn(shape, generator=generator) / math.prod(shape[1:]) ** 0.5
    return weight * 0.1 if module.endswith(MODULATION) else weight


def _write_small_components(directory: Path, seed: int) -> None:
    """Scheduler, tokenizers, text encoders and VAE of FLUX's shapes (saved through a pipeline with a tiny
    placeholder transformer, whose files :func:`write_flux_shaped` then replaces)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with tiny.seeded(seed):
        placeholder = FluxTransformer2DModel(num_layers=0, num_single_layers=0, attention_head_dim=8,
                                             num_attention_heads=1, joint_attention_dim=8,
                                             pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 8, 16, 16],
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                            scaling_factor=0.3611, shift_factor=0.1159)
        pipeline = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15, base_image_seq_len=256,
                                                      max_image_seq_len=4096),
            vae=vae, text_encoder=tiny.clip_text_encoder(768), tokenizer=tiny.tokenizer(77),
            text_encoder_2=tiny.t5_text_encoder(4096, feed_forward=256), tokenizer_2=tiny.tokenizer(512),
            transformer=placeholder,
        )
    tiny.finish(pipeline, torch.bfloat16).save_pretrained(directory)


def _write_small_sdxl_components(directory: Path, seed: int) -> None:
    """Scheduler, tokenizers, text encoders and VAE of SDXL's shapes (saved through a pipeline with a tiny
    placeholder UNet, whose files :func:`write_sdxl_shaped` then replaces)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    with tiny.seeded(seed):
        placeholder = UNet2DConditionModel(block_out_channels=(32, 32), norm_num_groups=8, layers_per_block=1,
                                           down_block_types=("DownBlock2D", "DownBlock2D"),
                                           up_block_types=("UpBlock2D", "UpBlock2D"), cross_attention_dim=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 16, 16],
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            layers_per_block=1, norm_num_groups=8, scaling_factor=0.13025)
        pipeline = StableDiffusionXLPipeline(
            scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1),
            vae=vae, text_encoder=tiny.clip_text_encoder(768), tokenizer=tiny.tokenizer(77),
            text_encoder_2=tiny.clip_text_encoder(1280, with_projection=True, projection=1280),
            tokenizer_2=tiny.tokenizer(77), unet=placeholder,
        )
    tiny.finish(pipeline, torch.bfloat16).save_pretrained(directory)
