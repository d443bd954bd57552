"""Model adapters: what to quantize in a diffusers transformer and how to run its pipeline (DESIGN.md §6).

An adapter is data: which block lists hold the linears, which linears read the same input (and so share λ),
which are AdaLN modulation linears (4-bit weights, 16-bit activations), which read non-negative inputs
(after GELU), the pipeline and transformer classes, the published generation protocol, and a builder for a
tiny offline model. Linears are found by module path, never by attention class names, which diffusers
renames between releases.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SvdqError


class AdapterMismatchError(SvdqError):
    """The loaded transformer does not have the layout the adapter expects."""


@dataclass(frozen=True)
class BlockList:
    """One list of repeated blocks (``transformer_blocks``) and the linears of each block.

    Attributes:
        path: module path of the ``nn.ModuleList``.
        groups: linear paths relative to a block; the paths of one tuple read the same input.
        optional: relative paths that some blocks lack (SD3's last block has no context MLP).
    """

    path: str
    groups: tuple[tuple[str, ...], ...]
    optional: tuple[str, ...] = ()


@dataclass(frozen=True)
class Protocol:
    """How the family's pipeline is called: steps, guidance, resolution and extra keyword arguments."""

    steps: int
    guidance: float
    resolution: int
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    """Everything svdq needs to know about one model family."""

    family: str
    pipeline_class: str
    transformer_class: str
    blocks: tuple[BlockList, ...]
    weight_only: tuple[str, ...]
    nonnegative: tuple[str, ...]
    protocol: Protocol
    build_tiny: Callable[..., object]
    latent_patch: int | None = None  # latent pixels per token side; None: the transformer's patch_size
    guidance_distilled: bool = False  # guidance is an input (Flux): one transformer pass a step, not two
    text_conditioned: bool = True  # prompts are text the pipeline encodes (DiT's are class labels)

    def passes_per_step(self, guidance: float) -> int:
        """Transformer passes a denoising step makes: two with classifier-free guidance."""
        return 1 if self.guidance_distilled or guidance <= 1.0 else 2

    def resolution_multiple(self, pipeline) -> int:
        """Image sizes the pipeline can take are multiples of this: VAE downsampling × latent patch."""
        patch = self.latent_patch or pipeline.transformer.config.get("patch_size", 1) or 1
        return getattr(pipeline, "vae_scale_factor", 8) * patch

    def resolution_error(self, pipeline, resolution: int, flag: str) -> str | None:
        """Why the pipeline cannot generate at ``resolution`` (``flag`` names the option), or None."""
        multiple = self.resolution_multiple(pipeline)
        if resolution % multiple:
            return (f"{flag} {resolution} is not a multiple of {multiple} (the model's VAE and patch size); try "
                    f"{max(multiple, resolution // multiple * multiple)}")
        positions = pipeline.transformer.config.get("pos_embed_max_size")  # SD3: a fixed table of positions
        if positions and resolution > positions * multiple:
            return (f"{flag} {resolution} exceeds the {positions * multiple} px its position embedding covers "
                    f"(pos_embed_max_size {positions})")
        return None

    def activation_bytes(self, pipeline, resolution: int, widest: int, element_size: int) -> tuple[int, str]:
        """An estimate of the largest activations one generation at ``resolution`` holds at once, and where:
        a transformer pass (tokens × the widest linear output, a few such tensors live) or the VAE decoder at
        full resolution (its first-level channels). A bound for refusing the impossible, not a prediction."""
        live = 4  # input, output and the intermediates of one layer
        tokens = (resolution // self.resolution_multiple(pipeline)) ** 2
        transformer = tokens * widest * element_size * live
        vae = getattr(pipeline, "vae", None)
        channels = (getattr(getattr(vae, "config", None), "block_out_channels", None) or [128])[0]
        decoder = resolution**2 * channels * element_size * live
        return max((transformer, "a transformer pass"), (decoder, "the VAE decoder"))

    def block_groups(self, transformer: nn.Module) -> list[tuple[str, list[list[str]]]]:
        """``[(block_name, [[linear path, …] per group])]`` in execution order, with full module paths.

        Raises:
            AdapterMismatchError: a block list or an expected linear is missing (names the diffusers version).
        """
        import diffusers

        modules = dict(transformer.named_modules())
        found = []
        for block_list in self.blocks:
            container = modules.get(block_list.path)
            if not isinstance(container, nn.ModuleList):
                raise AdapterMismatchError(
                    f"{self.family} adapter: no block list '{block_list.path}' in {type(transformer).__name__} "
                    f"(diffusers {diffusers.__version__})"
                )
            for index in range(len(container)):
                block = f"{block_list.path}.{index}"
                groups = []
                for group in block_list.groups:
                    present = []
                    for relative in group:
                        name = f"{block}.{relative}"
                        if isinstance(modules.get(name), nn.Linear):
                            present.append(name)
                        elif relative not in block_list.optional:
                            raise AdapterMismatchError(
                                f"{self.family} adapter: expected linear '{name}' not found "
                                f"(diffusers {diffusers.__version__})"
                            )
                    if present:
                        groups.append(present)
                found.append((block, groups))
        return found

    def is_weight_only(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, f"*.{pattern}") for pattern in self.weight_only)

    def is_nonnegative(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, f"*.{pattern}") for pattern in self.nonnegative)

    def generate(
        self,
        pipeline,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance: float,
        resolution: int,
        output_type: str = "pt",
    ) -> torch.Tensor:
        """Run the pipeline on ``prompts`` with one seeded generator per prompt; images in [0, 1] or latents.

        Generators live on the CPU, so a seed gives the same noise on any device.
        """
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        result = pipeline(
            prompt=prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=generators,
            output_type=output_type,
            **self.protocol.extra,
        )
        return result.images
