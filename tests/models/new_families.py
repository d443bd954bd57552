"""Tiny offline pipelines of families svdq has no preset for (transformers and UNets), saved in diffusers format
as a user's would be: the generic adapter (models/generic.py) must drive them from what the directory says."""

from __future__ import annotations

from pathlib import Path

from svdq_cli.models import flux, tiny


def chroma(seed: int = 0):
    """A ChromaPipeline: Flux-shaped blocks without per-block modulation linears (one approximator feeds all)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    with tiny.seeded(seed):
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(8, 12, 12),
            approximator_num_channels=16, approximator_hidden_dim=64, approximator_layers=2,
        )
        return ChromaPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer,
            vae=tiny.kl_vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5),
            text_encoder=tiny.t5_text_encoder(), tokenizer=tiny.tokenizer(64),
        )


def flux_kontext(seed: int = 0):
    """A FluxKontextPipeline around tiny-flux's components (image editing; without an image, text to image)."""
    from diffusers import FluxKontextPipeline

    components = {k: v for k, v in flux.build_tiny(seed).components.items() if v is not None}
    return FluxKontextPipeline(**components)


def qwen_image(seed: int = 0):
    """A QwenImagePipeline: a tiny Qwen2.5-VL text encoder (its vision tower unused by text prompts), the
    Qwen-Image VAE at two levels, dual-stream blocks with per-stream modulation."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocabulary = len(tiny.vocabulary())
    text = {"vocab_size": vocabulary, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "pad_token_id": 0, "eos_token_id": 1}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "fullatt_block_indexes": [0]}
    with tiny.seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=4,
            joint_attention_dim=64, axes_dims_rope=(8, 12, 12),
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, vocab_size=vocabulary, image_token_id=vocabulary - 1,
            video_token_id=vocabulary - 2, vision_start_token_id=vocabulary - 3,
        ))
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[False])
        return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                 tokenizer=tiny.tokenizer(1024), transformer=transformer)


def z_image(seed: int = 0):
    """A ZImagePipeline: single-stream blocks plus noise and context refiners, latents passed as a list of
    per-sample tensors, a tiny Qwen3 text encoder behind a chat template."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with tiny.seeded(seed):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=128, n_layers=2, n_refiner_layers=1,
            n_heads=4, n_kv_heads=4, cap_feat_dim=64, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64],
        )
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tiny.vocabulary()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1,
        ))
        tokenizer = tiny.tokenizer(64)
        tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
        return ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, tokenizer=tokenizer,
            vae=tiny.kl_vae(4, shift_factor=0.06, scaling_factor=1.5), transformer=transformer,
        )


def _flux2_transformer(guidance_embeds: bool):
    """FLUX.2's shared-modulation double and single blocks, tiny; [dev] embeds the guidance, [klein] does not."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=3 * 32, timestep_guidance_channels=64, axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=guidance_embeds,
    )


def _flux2_vae():
    """The FLUX.2 VAE (patchified, batch-normed latents) at two levels."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=8,
                              norm_num_groups=8)


def flux2_klein(seed: int = 0):
    """A Flux2KleinPipeline (FLUX.2 [klein], base: true classifier-free guidance on an empty negative prompt, so
    two encode_prompt calls a generation): a tiny Qwen3 causal LM whose layers 9, 18 and 27 are stacked into the
    text embedding, the FLUX.2 VAE (patchified, batch-normed latents), shared-modulation double and single
    blocks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with tiny.seeded(seed):
        transformer = _flux2_transformer(guidance_embeds=False)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tiny.vocabulary()), hidden_size=32, intermediate_size=64, num_hidden_layers=28,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, eos_token_id=1,
        ))
        tokenizer = tiny.tokenizer(64)
        tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
        vae = _flux2_vae()
        return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                  tokenizer=tokenizer, transformer=transformer)


CONTENT_TEMPLATE = ("{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
                    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }} "
                    "{% endif %}{% endfor %}{% endif %}{% endfor %}")  # messages whose content is a list of parts


def flux2_dev(seed: int = 0):
    """A Flux2Pipeline (FLUX.2 [dev]: guidance-distilled, guidance embedded): a tiny Mistral 3 (text and Pixtral
    vision towers, the vision one unused by text prompts) whose layers 10, 20 and 30 are stacked into the text
    embedding, the FLUX.2 VAE, klein's transformer class with a guidance embedder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = {"vocab_size": len(tiny.vocabulary()), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 30,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "pad_token_id": 0, "eos_token_id": 1,
            "bos_token_id": 3, "max_position_embeddings": 512}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16, "head_dim": 8}
    with tiny.seeded(seed):
        transformer = _flux2_transformer(guidance_embeds=True)
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=text, vision_config=vision, image_token_index=2, spatial_merge_size=1))
        tokenizer = tiny.tokenizer(64)
        tokenizer.chat_template = CONTENT_TEMPLATE
        vae = _flux2_vae()
        return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)


def wan(seed: int = 0):
    """A WanPipeline (Wan 2.x text to video): a tiny UMT5 text encoder, the Wan VAE at two levels halving time
    once, 3D patches of 1×2×2 and rotary positions over frames, height and width."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with tiny.seeded(seed):
        transformer = WanTransformer3DModel(
            num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=8, text_dim=64, freq_dim=64,
            ffn_dim=256, num_layers=2, rope_max_seq_len=64,
        )
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tiny.vocabulary()), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
            pad_token_id=0, eos_token_id=1,
        ))
        vae = AutoencoderKLWan(base_dim=8, z_dim=8, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                               latents_mean=[0.0] * 8, latents_std=[1.0] * 8, scale_factor_temporal=2,
                               scale_factor_spatial=2)
        return WanPipeline(tokenizer=tiny.tokenizer(64), text_encoder=text_encoder, vae=vae, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _unet(cross_attention_dim: int, **config):
    """A two-level UNet2DConditionModel at 64 and 128 channels: a plain level, then one with cross-attention
    transformers (GEGLU feed-forward, linear projections in and out), a mid block, and the mirror way up."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(4, 8), use_linear_projection=True, **config,
    )


def stable_diffusion_xl(seed: int = 0):
    """A StableDiffusionXLPipeline: two CLIP text encoders (the second pooled and projected), a UNet with
    SDXL's text-and-time added conditioning and two transformer layers per attention block at level 2."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    with tiny.seeded(seed):
        unet = _unet(64, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
        return StableDiffusionXLPipeline(
            vae=tiny.kl_vae(4), text_encoder=tiny.clip_text_encoder(32), tokenizer=tiny.tokenizer(77),
            text_encoder_2=tiny.clip_text_encoder(32, with_projection=True), tokenizer_2=tiny.tokenizer(77),
            unet=unet, scheduler=EulerDiscreteScheduler(timestep_spacing="trailing"),
        )


def stable_diffusion(seed: int = 0):
    """A StableDiffusionPipeline (SD 1.x/2.x): one CLIP text encoder, a UNet with cross-attention, no safety
    checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    with tiny.seeded(seed):
        return StableDiffusionPipeline(
            vae=tiny.kl_vae(4), text_encoder=tiny.clip_text_encoder(64), tokenizer=tiny.tokenizer(77),
            unet=_unet(64), scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )


BUILDERS = {"ChromaPipeline": chroma, "Flux2Pipeline": flux2_dev, "Flux2KleinPipeline": flux2_klein,
            "FluxKontextPipeline": flux_kontext, "QwenImagePipeline": qwen_image, "ZImagePipeline": z_image}
VIDEO_BUILDERS = {"WanPipeline": wan}
UNET_BUILDERS = {"StableDiffusionXLPipeline": stable_diffusion_xl, "StableDiffusionPipeline": stable_diffusion}


TINY_RECIPE = """
model: ""
family: diffusers
dtype: float32
device: cpu
quant: {{method: svdquant, precision: int4, rank: 16, calib_rows: 128, search_rows: 64}}
calibration: {{num_prompts: 2, steps: 2, resolution: 64}}
validation: {{num_prompts: 1, steps: 2, resolution: 64}}
pipeline_args: {pipeline_args}
"""


def tiny_recipe(directory: Path, pipeline_args: str = "{max_sequence_length: 32}") -> Path:
    """A generic recipe sized for these models (float32 on the CPU, rank 16, two calibration prompts and one
    validation prompt, two steps at 64 px), written to ``directory``."""
    path = Path(directory) / "tiny-generic.yaml"
    path.write_text(TINY_RECIPE.format(pipeline_args=pipeline_args))
    return path


def saved(name: str, directory: Path) -> Path:
    """The tiny pipeline ``name`` saved under ``directory`` (once: later calls reuse it)."""
    path = Path(directory) / name
    if not (path / "model_index.json").exists():
        {**BUILDERS, **UNET_BUILDERS, **VIDEO_BUILDERS}[name]().save_pretrained(path)
    return path
