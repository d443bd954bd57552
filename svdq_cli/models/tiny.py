"""Building blocks of the built-in tiny models: seeded random weights from small configs, tokenizers made in
code, no download. They feed the tests and the demo.

Random weights have none of the activation outliers that make 4-bit activations hard, so
:func:`plant_modulation_outliers` plants them where real DiTs have them: a few channels of the adaptive-norm
*scale* (``1 + scale`` multiplies the normalized hidden state) are raised by 20–50, so those channels of every
attention and MLP input become 20–50× larger than the rest, as in FLUX and PixArt.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..calibration.prompts import BUILTIN, load_prompts

SPECIAL = ("<pad>", "</s>", "<unk>", "<s>")


def vocabulary() -> list[str]:
    """Special tokens, then every lowercase word of the shipped prompt sets (sorted: stable ids)."""
    words = set()
    for source in BUILTIN:
        for prompt in load_prompts(source):
            words.update(re.findall(r"\w+|[^\w\s]", prompt.lower()))
    return [*SPECIAL, *sorted(words)]


def tokenizer(max_length: int):
    """A word-level fast tokenizer over :func:`vocabulary` that appends ``</s>`` (T5/CLIP-like enough for the
    pipelines: padding, truncation, ``model_max_length``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>",
        model_max_length=max_length,
    )


def clip_text_encoder(hidden: int = 32, with_projection: bool = False, projection: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocabulary()), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=projection, max_position_embeddings=77,
        pad_token_id=0, eos_token_id=1, bos_token_id=3,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_text_encoder(hidden: int = 64, feed_forward: int | None = None):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(vocabulary()), d_model=hidden, d_ff=feed_forward or 2 * hidden,
                                   d_kv=16, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1))


def kl_vae(latent_channels: int, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], latent_channels=latent_channels,
        layers_per_block=1, norm_num_groups=8, **config,
    )


def seeded(seed: int):
    """Context for building modules with seeded random weights without touching the caller's RNG."""
    fork = torch.random.fork_rng(devices=[])

    class _Seeded:
        def __enter__(self):
            fork.__enter__()
            torch.manual_seed(seed)

        def __exit__(self, *exc):
            return fork.__exit__(*exc)

    return _Seeded()


def outlier_channels(dim: int, generator: torch.Generator, count: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` channels of a hidden state and the gain (20–50) planted on each."""
    channels = torch.randperm(dim, generator=generator)[:count]
    return channels, 20 + 30 * torch.rand(count, generator=generator)


@torch.no_grad()
def plant_modulation_outliers(
    linear: nn.Linear, chunks: int, scale_chunks: tuple[int, ...], channels: torch.Tensor, gains: torch.Tensor
) -> None:
    """Raise the bias of the adaptive-norm *scale* outputs of ``linear`` at ``channels`` so ``1 + scale``
    is about ``gains`` there. ``linear`` outputs ``chunks`` equal slices (shift, scale, gate, …)."""
    dim = linear.out_features // chunks
    for chunk in scale_chunks:
        linear.bias[chunk * dim + channels] += gains.to(linear.bias.dtype)


@torch.no_grad()
def plant_table_outliers(table: torch.Tensor, scale_rows: tuple[int, ...], channels: torch.Tensor,
                         gains: torch.Tensor) -> None:
    """The same for PixArt/Sana-style ``scale_shift_table`` parameters ``[6, dim]``."""
    for row in scale_rows:
        table[row, channels] += gains.to(table.dtype)


def finish(pipeline, dtype: torch.dtype):
    """Inference mode for every component (modules built from configs start in training mode, where T5's
    dropout would make each generation random) and the requested dtype."""
    for component in pipeline.components.values():
        if isinstance(component, nn.Module):
            component.eval()
    return pipeline.to(dtype=dtype)
