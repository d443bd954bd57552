"""Tiny offline pipelines of families svdq has no preset for, saved in diffusers format as a user's would be:
the generic adapter (models/generic.py) must drive them from what the directory says."""

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


BUILDERS = {"ChromaPipeline": chroma, "FluxKontextPipeline": flux_kontext}


def saved(name: str, directory: Path) -> Path:
    """The tiny pipeline ``name`` saved under ``directory`` (once: later calls reuse it)."""
    path = Path(directory) / name
    if not (path / "model_index.json").exists():
        BUILDERS[name]().save_pretrained(path)
    return path
