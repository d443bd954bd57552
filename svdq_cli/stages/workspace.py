"""The workspace: what the stages of one process share — the config, the model's adapter, the 16-bit model
(loaded lazily, whole or streamed block by block), the prompts' text encodings and the run's cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from ..calibration.prompts import identity, load_prompts
from ..errors import BadInputError
from ..models.base import Adapter
from ..models.discovery import Layout, block_paths, discover
from ..models.loading import adapter_of, load_pipeline, model_directory
from ..models.resolution import Resolution, label, scaled
from ..models.streaming import (
    BlockStreamer,
    component_checkpoint,
    component_config,
    empty_model,
)
from ..models.targets import Target, fallback_warning, plan_targets
from ..models.text_first import Encoding, encode, from_tensors, replaying, to_tensors
from ..run.cache import Cache
from ..run.directory import FAULT_VARIABLE, Run, library_versions  # noqa: F401 (FAULT_VARIABLE: for tests)
from ..run.recipe import CalibrationConfig, RunConfig
from ..runtime.layers import replace_module
from ..system.device import free_memory, resolve_device
from ..system.distributed import World
from ..system.progress import say, task, warn
from ..version import __version__
from .base import leader_only


class Workspace:
    """What the stages of one process share: the config, the adapter, the 16-bit model (loaded lazily, whole
    or streamed block by block), the prompts' text encodings and the run's cache."""

    def __init__(self, config: RunConfig, cache_dir: Path | None = None, world: World | None = None,
                 cache_encodings: bool = True) -> None:
        self.config = config
        self.cache_encodings = cache_encodings  # False: an evaluation's thousands of prompts (MBs each) stay off disk
        self.world = world or World()
        self.adapter: Adapter = adapter_of(config.family, config.model, config.pipeline_args)
        self.dtype = getattr(torch, config.dtype)
        self.device = self.world.device(resolve_device(config.device))
        self.cache = Cache(cache_dir) if cache_dir is not None else None

    @cached_property
    def directory(self) -> Path | None:
        """The model's local diffusers directory (None: a built-in tiny model, built in memory)."""
        return model_directory(self.config.model)

    @cached_property
    def streamed(self) -> bool:
        """Whether the denoiser is read block by block from its checkpoint (see RunConfig.stream)."""
        if self.directory is None:
            if self.config.stream:
                warn(f"--stream: {self.config.model} is built in memory, not read from a checkpoint; not streaming")
            return False
        if self.config.stream is not None:
            return self.config.stream
        if self.config.offload:
            return False
        size = sum(f.stat().st_size for f in (self.directory / self.adapter.denoiser).glob("*.safetensors"))
        return 2 * size > free_memory("cpu")

    @cached_property
    def streamer(self) -> BlockStreamer | None:
        """The block streamer of a streamed denoiser (None when the denoiser is whole in memory)."""
        if not self.streamed:
            return None
        import diffusers

        model_class = getattr(diffusers, self.adapter.denoiser_class)
        model = empty_model(model_class, component_config(self.directory, self.adapter.denoiser), self.dtype)
        paths = block_paths(model)
        checkpoint = component_checkpoint(self.directory, self.adapter.denoiser)
        say(f"streaming {self.config.model}: {len(paths)} blocks read one at a time from "
            f"{checkpoint.nbytes / 2**30:.1f} GiB of weights ({self.config.dtype}, {self.device})")
        return BlockStreamer(model, checkpoint, paths, self.device)

    @cached_property
    def pipeline(self):
        """The generating pipeline; a streamed one has no text encoders (prompts are encoded first)."""
        if self.streamer is not None:
            return load_pipeline(self.config.model, self.adapter, self.dtype, self.device,
                                 denoiser=self.streamer.model, without=("text_encoders",))
        say(f"loading {self.config.model} ({self.config.dtype}, {self.device})")
        return load_pipeline(self.config.model, self.adapter, self.dtype, self.device, self.config.offload)

    @property
    def denoiser(self) -> nn.Module:
        """The model svdq quantizes: the pipeline's transformer or UNet."""
        return self.streamer.model if self.streamer is not None else self.adapter.denoiser_of(self.pipeline)

    @cached_property
    def discovered(self) -> Layout:
        """What could be quantized, found by tracing the denoiser's first call in a calibration generation (see
        :mod:`..models.discovery`); kept in the run's cache, so a resumed run does not encode a prompt for it."""
        # The family's own protocol at a small size: the structure traced is the same at any resolution, and a
        # first denoiser call at 1024 px costs minutes on a CPU (a tiny VAE makes it 262k tokens).
        multiple = self.adapter.resolution_multiple(self.pipeline)
        section = CalibrationConfig(prompts=self.config.calibration.prompts,
                                    resolution=max(multiple, 64 // multiple * multiple))
        prompt = load_prompts(section.prompts, 1)[0]
        fields = {"model": self.config.model, "family": self.config.family, "dtype": self.config.dtype,
                  "versions": {**library_versions(), "svdq": __version__}}
        cached = self.cache.get("layout", fields) if self.cache else None
        if cached is not None:
            return Layout.from_json(cached[1]["layout"])
        encoding = self.encodings([prompt], section)[0]
        layout = discover(self.denoiser, lambda: self.generate_one(prompt, 0, encoding, section, "latent"),
                          self.dtype)
        if self.cache:
            self.cache.put("layout", fields, {}, {"layout": layout.to_json()})
        return layout

    @cached_property
    def planned(self) -> tuple[Layout, list[Target]]:
        """The layout this run quantizes (the discovered one under the quantization and the recipe's targets
        overrides) and a row for every linear saying what happens to it and why."""
        return plan_targets(self.discovered, self.denoiser, self.config.quant, self.config.targets)

    @property
    def layout(self) -> Layout:
        return self.planned[0]

    @property
    def blocks(self) -> list[tuple[str, list[list[str]]]]:
        """``[(block name, groups of linear names)]``: the layout's."""
        return self.layout.blocks

    @cached_property
    def originals(self) -> dict[str, nn.Linear]:
        """Every target linear of the 16-bit denoiser, captured before any swap (a streamed block's have
        their weights only inside :meth:`block_resident`)."""
        modules = dict(self.denoiser.named_modules())
        return {name: modules[name] for _, groups in self.blocks for group in groups for name in group}

    def block_resident(self, index: int):
        """Block ``index``'s 16-bit weights in memory for the duration (they always are when not streamed)."""
        return self.streamer.resident(index) if self.streamer is not None else nullcontext()

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s 16-bit tensors by full name (read from the checkpoint when streamed)."""
        if self.streamer is not None:
            return self.streamer.block_tensors(index)
        prefix = f"{self.blocks[index][0]}."
        return {n: t.detach() for n, t in self.denoiser.state_dict().items() if n.startswith(prefix)}

    @contextmanager
    def with_layers(self, layers_of_block: Callable[[int], dict[str, nn.Module]]):
        """Generate with ``layers_of_block(index)``'s modules in place of each block's 16-bit linears: all at
        once in memory, or per block as it runs when streamed."""
        if self.streamer is not None:
            with self.streamer.overlaid(layers_of_block):
                yield
            return

        originals = self.originals  # taken before any replacement: it reads the denoiser's modules
        layers = {name: layer.to(self.device) for index in range(len(self.blocks))
                  for name, layer in layers_of_block(index).items()}
        for name, layer in layers.items():
            replace_module(self.denoiser, name, layer)
        try:
            yield
        finally:
            for name in layers:
                replace_module(self.denoiser, name, originals[name])

    def settings(self, section) -> tuple[int, float, Resolution]:
        """Steps, guidance and resolution of a calibration or validation section (the protocol's by default)."""
        protocol = self.adapter.protocol
        guidance = protocol.guidance if section.guidance is None else section.guidance
        return section.steps or protocol.steps, guidance, section.resolution or protocol.resolution

    def _encoding_fields(self, prompt: str, guidance: float) -> dict:
        return {"model": self.config.model, "family": self.config.family, "dtype": self.config.dtype,
                "prompt": identity(prompt), "guidance": guidance, "extra": self.adapter.protocol.extra,
                "form": "every encode_prompt call",  # the cache once held the first call only
                "versions": {**library_versions(), "svdq": __version__}}

    def encodings(self, prompts: list[str], section) -> list[Encoding]:
        """Each prompt's text encoding for ``section``'s settings, from the cache or computed now (all missing
        ones in one pass of the text encoders, which a streamed run then frees)."""
        if not self.adapter.text_conditioned:  # class labels: nothing to encode
            return [() for _ in prompts]
        steps, guidance, resolution = self.settings(section)
        cache = self.cache if self.cache_encodings else None
        found = {p: cache.get("text", self._encoding_fields(p, guidance)) if cache else None for p in prompts}
        missing = [p for p in prompts if found[p] is None]
        if missing:
            pipeline = self._text_pipeline
            denoiser = self.adapter.denoiser_of(pipeline)
            with task("encode", len(missing)) as advance:
                for prompt in missing:
                    encoding = encode(pipeline, denoiser, lambda pipe, p=prompt: self.adapter.generate(
                        pipe, [p], [0], steps, guidance, resolution, output_type="latent"))
                    found[prompt] = to_tensors(encoding)
                    if cache:
                        cache.put("text", self._encoding_fields(prompt, guidance), *found[prompt])
                    advance(prompt[:40])
        return [from_tensors(*found[p]) for p in prompts]

    @cached_property
    def _text_pipeline(self):
        """A pipeline that can encode prompts: the generating one, or (streamed) one with the streamer's
        denoiser, whose blocks are never read since the call stops at the encoding (a UNet pipeline reads its
        config before), and which lives only as long as the encoding pass (see :meth:`encode_prompts`)."""
        if self.streamer is None:
            return self.pipeline

        say(f"encoding prompts with {self.config.model}'s text encoders")
        return load_pipeline(self.config.model, self.adapter, self.dtype, self.device, denoiser=self.streamer.model)

    def stage_world(self, stage: str) -> World:
        """The ranks that share ``stage``: the run's world, or a one-rank world for a stage rank 0 runs alone
        (:func:`leader_only`; the other ranks skip it)."""
        return World() if leader_only(stage, self.config) else self.world

    def calibration_prompts(self) -> tuple[list[str], list[int]]:
        """The calibration prompts, and the indices of those this rank runs (all of them in one process)."""
        prompts = load_prompts(self.config.calibration.prompts, self.config.calibration.num_prompts)
        return prompts, [index for index in range(len(prompts)) if self.world.owns(index)]

    def encode_prompts(self, todo: list[str]) -> None:
        """Encode every prompt the stages to run will generate on this rank, before the denoiser is touched;
        then free the text encoders of a streamed model."""
        if "collect" in todo:
            prompts, mine = self.calibration_prompts()
            self.encodings([prompts[index] for index in mine], self.config.calibration)
        if "validate" in todo:
            section, world = self.config.validation, self.stage_world("validate")
            prompts = load_prompts(section.prompts, section.num_prompts)
            self.encodings([p for index, p in enumerate(prompts) if world.owns(index)], section)
        self.__dict__.pop("_text_pipeline", None)

    def generate(self, prompts: list[str], seeds: list[int], section, output_type: str = "pt",
                 progress: str | None = None) -> list[torch.Tensor]:
        """One generation per prompt (bounded memory) with its cached text encoding."""
        outputs = []
        with task(progress or "generate", len(prompts)) as advance:
            for prompt, seed, encoding in zip(prompts, seeds, self.encodings(prompts, section), strict=True):
                outputs.append(self.generate_one(prompt, seed, encoding, section, output_type))
                advance(prompt[:40])
        return outputs

    def generate_one(self, prompt: str, seed: int, encoding: Encoding, section,
                     output_type: str = "pt") -> torch.Tensor:
        """One generation with ``prompt``'s text encoding replayed."""
        steps, guidance, resolution = self.settings(section)
        with replaying(self.pipeline, encoding) if self.adapter.text_conditioned else nullcontext():
            return self.adapter.generate(self.pipeline, [prompt], [seed], steps, guidance, resolution,
                                         output_type=output_type)

    def preflight(self, todo: list[str]) -> None:
        """Check the loaded model against the config before any stage runs (a long collect is not wasted on
        a rank or a resolution that could never work).

        Raises:
            BadInputError: nothing left to quantize, a rank larger than a layer, a resolution the model cannot
                take, the emulated runtime on a GPU device.
        """
        quant = self.config.quant
        rank = 0 if quant.is_vector else quant.effective_rank
        if (narrow := fallback_warning(self.planned[1])) is not None:
            warn(narrow)
        if not self.layout.targets:
            raise BadInputError(f"no linear layer of {self.config.model} is left to quantize; `svdq targets "
                                f"{self.config.model}` shows why each stays 16-bit")
        for name, module in self.originals.items():
            if rank > min(module.in_features, module.out_features):
                raise BadInputError(f"--rank {rank} exceeds layer {name} "
                                    f"(min(in, out) = {min(module.in_features, module.out_features)})")
        for section, flag in ((self.config.calibration, "--resolution"), (self.config.validation, "--val-resolution")):
            error = self.adapter.resolution_error(self.pipeline, self.settings(section)[2], flag)
            if error:
                raise BadInputError(error)
            self.check_fits(section, flag)
        self.check_steps()
        if "validate" in todo and self.config.validation.runtime == "emulated" and self.device != "cpu":
            raise BadInputError("--runtime emulated runs the kernels on the CPU emulator: add --device cpu")
        if self.device == "cpu":
            self.say_cpu_cost(todo)

    def check_fits(self, section, flag: str) -> None:
        """Refuse a resolution whose activations cannot fit in this device's free memory (the model is loaded
        already), naming the largest that would.

        Raises:
            BadInputError: the estimate of :meth:`Adapter.activation_bytes` exceeds the free memory.
        """
        _, guidance, resolution = self.settings(section)
        widest = max(module.out_features for module in self.originals.values())
        element_size = torch.empty((), dtype=self.dtype).element_size()
        passes = self.adapter.passes_per_step(guidance)  # guidance batches two images
        needed, where = self.adapter.activation_bytes(self.pipeline, resolution, widest, element_size)
        needed *= passes
        free = free_memory(self.device)
        if needed > free:
            fits = scaled(resolution, free / needed, self.adapter.resolution_multiple(self.pipeline))
            raise BadInputError(f"{flag} {resolution} needs about {needed / 2**30:,.1f} GiB for {where}, more than "
                                f"the {free / 2**30:.1f} GiB free on {self.device}; at most about {label(fits)} "
                                "fits")

    def check_steps(self) -> None:
        """Refuse more denoising steps than the scheduler has timesteps (it could only repeat them)."""
        scheduler = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000
        for section, flag in ((self.config.calibration, "--steps"), (self.config.validation, "--val-steps")):
            steps = self.settings(section)[0]
            if steps > timesteps:
                raise BadInputError(f"{flag} {steps} exceeds the scheduler's {timesteps} training timesteps")

    def say_cpu_cost(self, todo: list[str]) -> None:
        """On a CPU, one line per generating stage whose estimated cost exceeds a minute, with the flags that
        size it (a full-size protocol on a CPU would otherwise run for hours without a word)."""
        params = sum(p.numel() for p in self.denoiser.parameters())
        heads, head_dim = (self.denoiser.config.get(key) for key in ("num_attention_heads", "attention_head_dim"))
        width = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else \
            max(module.in_features for module in self.originals.values())  # a UNet: per-level widths
        text_tokens = int(self.adapter.protocol.extra.get("max_sequence_length", 120))
        rate = _cpu_flop_rate()
        for name, section, flags in (("collect", self.config.calibration, "--num-prompts/--steps/--resolution"),
                                     ("validate", self.config.validation,
                                      "--val-prompts/--val-steps/--val-resolution")):
            if name not in todo:
                continue
            steps, guidance, resolution = self.settings(section)
            tokens = self.adapter.tokens(self.pipeline, resolution) + text_tokens
            per_pass = 2 * params * tokens + 4 * tokens**2 * width * len(self.blocks)  # linears + attention
            generations = section.num_prompts * (1 + len(getattr(section, "baselines", ())) + 1) \
                if name == "validate" else section.num_prompts  # validate: 16-bit, quantized, baselines
            seconds = per_pass * steps * self.adapter.passes_per_step(guidance) * generations / rate
            if seconds > 60:
                span = f"{seconds / 3600:.1f} h" if seconds > 7200 else f"{seconds / 60:.0f} min"
                say(f"{name}: about {span} on this CPU (estimated: {section.num_prompts} prompts × {steps} steps at "
                    f"{label(resolution)}); size it with {flags}")


def _cpu_flop_rate() -> float:
    """This CPU's float32 matmul rate now, from a quick measurement (for cost notices only)."""
    a = torch.randn(384, 384)
    start = time.perf_counter()
    for _ in range(8):
        a @ a
    return 8 * 2 * 384**3 / max(time.perf_counter() - start, 1e-6)
