"""The stage pipeline: collect → smooth → svd → quantize → validate → export (DESIGN.md §3–§4).

Each stage declares the config fields it reads and the stages it reads from; its hash covers both, so a
changed field re-runs that stage and those after it, nothing before. Stages that work per block write one
artifact per transformer block, so an interrupted stage continues at the next block; a finished stage whose
artifacts verify is skipped; a missing or altered artifact is recomputed with a warning naming it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..cache import Cache
from ..device import resolve_device
from ..distributed import World
from ..errors import BadInputError, SvdqError
from ..models import Adapter, get_adapter
from ..models.streaming import release_free_memory
from ..progress import say, task, warn
from ..recipe import RunConfig
from ..run import FAULT_VARIABLE, Run, library_versions  # noqa: F401 (FAULT_VARIABLE: for tests)
from ..threads import single_threaded

if TYPE_CHECKING:
    from ..models.streaming import BlockStreamer
    from ..models.text_first import Encoding

ORDER = ("collect", "smooth", "svd", "quantize", "validate", "export")


class Workspace:
    """What the stages of one process share: the config, the adapter, the 16-bit model (loaded lazily, whole
    or streamed block by block), the prompts' text encodings and the run's cache."""

    def __init__(self, config: RunConfig, cache_dir: Path | None = None, world: World | None = None) -> None:
        self.config = config
        self.world = world or World()
        self.adapter: Adapter = get_adapter(config.family)
        self.dtype = getattr(torch, config.dtype)
        self.device = self.world.device(resolve_device(config.device))
        self.cache = Cache(cache_dir) if cache_dir is not None else None

    @cached_property
    def directory(self) -> Path | None:
        """The model's local diffusers directory (None: a built-in tiny model, built in memory)."""
        from ..models.loading import model_directory

        return model_directory(self.config.model)

    @cached_property
    def streamed(self) -> bool:
        """Whether the transformer is read block by block from its checkpoint (see RunConfig.stream)."""
        if self.directory is None:
            if self.config.stream:
                warn(f"--stream: {self.config.model} is built in memory, not read from a checkpoint; not streaming")
            return False
        if self.config.stream is not None:
            return self.config.stream
        if self.config.offload:
            return False
        import psutil

        size = sum(f.stat().st_size for f in (self.directory / "transformer").glob("*.safetensors"))
        return 2 * size > psutil.virtual_memory().available

    @cached_property
    def streamer(self) -> BlockStreamer | None:
        """The block streamer of a streamed transformer (None when the transformer is whole in memory)."""
        if not self.streamed:
            return None
        import diffusers

        from ..models.streaming import BlockStreamer, empty_model, transformer_checkpoint, transformer_config

        model_class = getattr(diffusers, self.adapter.transformer_class)
        model = empty_model(model_class, transformer_config(self.directory), self.dtype)
        paths = [block for block, _ in self.adapter.block_groups(model)]
        checkpoint = transformer_checkpoint(self.directory)
        say(f"streaming {self.config.model}: {len(paths)} blocks read one at a time from "
            f"{checkpoint.nbytes / 2**30:.1f} GiB of weights ({self.config.dtype}, {self.device})")
        return BlockStreamer(model, checkpoint, paths, self.device)

    @cached_property
    def pipeline(self):
        """The generating pipeline; a streamed one has no text encoders (prompts are encoded first)."""
        from ..models.loading import load_pipeline

        if self.streamer is not None:
            return load_pipeline(self.config.model, self.adapter, self.dtype, self.device,
                                 transformer=self.streamer.model, without=("text_encoders",))
        say(f"loading {self.config.model} ({self.config.dtype}, {self.device})")
        return load_pipeline(self.config.model, self.adapter, self.dtype, self.device, self.config.offload)

    @property
    def transformer(self) -> nn.Module:
        return self.streamer.model if self.streamer is not None else self.pipeline.transformer

    @cached_property
    def blocks(self) -> list[tuple[str, list[list[str]]]]:
        """``[(block name, groups of linear names)]`` found by the adapter."""
        return self.adapter.block_groups(self.transformer)

    @cached_property
    def originals(self) -> dict[str, nn.Linear]:
        """Every target linear of the 16-bit transformer, captured before any swap (a streamed block's have
        their weights only inside :meth:`block_resident`)."""
        modules = dict(self.transformer.named_modules())
        return {name: modules[name] for _, groups in self.blocks for group in groups for name in group}

    def block_resident(self, index: int):
        """Block ``index``'s 16-bit weights in memory for the duration (they always are when not streamed)."""
        return self.streamer.resident(index) if self.streamer is not None else nullcontext()

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s 16-bit tensors by full name (read from the checkpoint when streamed)."""
        if self.streamer is not None:
            return self.streamer.block_tensors(index)
        prefix = f"{self.blocks[index][0]}."
        return {n: t.detach() for n, t in self.transformer.state_dict().items() if n.startswith(prefix)}

    @contextmanager
    def with_layers(self, layers_of_block: Callable[[int], dict[str, nn.Module]]):
        """Generate with ``layers_of_block(index)``'s modules in place of each block's 16-bit linears: all at
        once in memory, or per block as it runs when streamed."""
        if self.streamer is not None:
            with self.streamer.overlaid(layers_of_block):
                yield
            return
        from ..api import replace_module

        layers = {name: layer.to(self.device) for index in range(len(self.blocks))
                  for name, layer in layers_of_block(index).items()}
        for name, layer in layers.items():
            replace_module(self.transformer, name, layer)
        try:
            yield
        finally:
            for name in layers:
                replace_module(self.transformer, name, self.originals[name])

    def settings(self, section) -> tuple[int, float, int]:
        """Steps, guidance and resolution of a calibration or validation section (the protocol's by default)."""
        protocol = self.adapter.protocol
        guidance = protocol.guidance if section.guidance is None else section.guidance
        return section.steps or protocol.steps, guidance, section.resolution or protocol.resolution

    def _encoding_fields(self, prompt: str, guidance: float) -> dict:
        from .. import __version__

        return {"model": self.config.model, "family": self.config.family, "dtype": self.config.dtype,
                "prompt": prompt, "guidance": guidance, "extra": self.adapter.protocol.extra,
                "versions": {**library_versions(), "svdq": __version__}}

    def encodings(self, prompts: list[str], section) -> list[Encoding]:
        """Each prompt's text encoding for ``section``'s settings, from the cache or computed now (all missing
        ones in one pass of the text encoders, which a streamed run then frees)."""
        from ..models.text_first import encode, from_tensors, to_tensors

        if not self.adapter.text_conditioned:  # class labels: nothing to encode
            return [() for _ in prompts]
        steps, guidance, resolution = self.settings(section)
        found = {p: self.cache.get("text", self._encoding_fields(p, guidance)) if self.cache else None
                 for p in prompts}
        missing = [p for p in prompts if found[p] is None]
        if missing:
            pipeline = self._text_pipeline
            with task("encode", len(missing)) as advance:
                for prompt in missing:
                    encoding = encode(pipeline, lambda pipe, p=prompt: self.adapter.generate(
                        pipe, [p], [0], steps, guidance, resolution, output_type="latent"))
                    tensors, empty = to_tensors(encoding)
                    found[prompt] = (tensors, {"empty": json.dumps(empty)})
                    if self.cache:
                        self.cache.put("text", self._encoding_fields(prompt, guidance), *found[prompt])
                    advance(prompt[:40])
        return [from_tensors(found[p][0], json.loads(found[p][1]["empty"])) for p in prompts]

    @cached_property
    def _text_pipeline(self):
        """A pipeline that can encode prompts: the generating one, or (streamed) one without a transformer that
        lives only as long as the encoding pass (see :meth:`encode_prompts`)."""
        if self.streamer is None:
            return self.pipeline
        from ..models.loading import load_pipeline

        say(f"encoding prompts with {self.config.model}'s text encoders")
        return load_pipeline(self.config.model, self.adapter, self.dtype, self.device, without=("transformer",))

    def stage_world(self, stage: str) -> World:
        """The ranks that share ``stage``: the run's world, or a one-rank world for a stage rank 0 runs alone
        (:func:`leader_only`; the other ranks skip it)."""
        return World() if leader_only(stage, self.config) else self.world

    def calibration_prompts(self) -> tuple[list[str], list[int]]:
        """The calibration prompts, and the indices of those this rank runs (all of them in one process)."""
        from ..prompts import load_prompts

        prompts = load_prompts(self.config.calibration.prompts, self.config.calibration.num_prompts)
        return prompts, [index for index in range(len(prompts)) if self.world.owns(index)]

    def encode_prompts(self, todo: list[str]) -> None:
        """Encode every prompt the stages to run will generate on this rank, before the transformer is touched;
        then free the text encoders of a streamed model."""
        from ..prompts import load_prompts

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
        from ..models.text_first import replaying

        steps, guidance, resolution = self.settings(section)
        with replaying(self.pipeline, encoding) if self.adapter.text_conditioned else nullcontext():
            return self.adapter.generate(self.pipeline, [prompt], [seed], steps, guidance, resolution,
                                         output_type=output_type)

    def preflight(self, todo: list[str]) -> None:
        """Check the loaded model against the config before any stage runs (a long collect is not wasted on
        a rank or a resolution that could never work).

        Raises:
            BadInputError: a layer the group size does not divide, a rank larger than a layer, a resolution
                the model cannot take, the emulated runtime on a GPU device.
        """
        quant = self.config.quant
        group, rank = (quant.vq_dim, 0) if quant.is_vector else (quant.group_size, quant.effective_rank)
        what = "the vector dimension (vq_dim)" if quant.is_vector else "the group size"
        for name, module in self.originals.items():
            if module.in_features % group:
                raise BadInputError(f"layer {name}: in_features {module.in_features} is not divisible by {what} "
                                    f"{group}")
            if rank > min(module.in_features, module.out_features):
                raise BadInputError(f"--rank {rank} exceeds layer {name} "
                                    f"(min(in, out) = {min(module.in_features, module.out_features)})")
        multiple = self.adapter.resolution_multiple(self.pipeline)
        for section, flag in ((self.config.calibration, "--resolution"), (self.config.validation, "--val-resolution")):
            error = self.adapter.resolution_error(self.pipeline, section.resolution or self.adapter.protocol.resolution,
                                                  flag)
            if error:
                raise BadInputError(error)
        if "validate" in todo and self.config.validation.runtime == "emulated" and self.device != "cpu":
            raise BadInputError("--runtime emulated runs the kernels on the CPU emulator: add --device cpu")
        if self.device == "cpu":
            self.say_cpu_cost(todo, multiple)

    def say_cpu_cost(self, todo: list[str], multiple: int) -> None:
        """On a CPU, one line per generating stage whose estimated cost exceeds a minute, with the flags that
        size it (a full-size protocol on a CPU would otherwise run for hours without a word)."""
        transformer = self.transformer
        params = sum(p.numel() for p in transformer.parameters())
        config = transformer.config
        width = config.get("num_attention_heads", 1) * config.get("attention_head_dim", 64)
        text_tokens = int(self.adapter.protocol.extra.get("max_sequence_length", 120))
        rate = _cpu_flop_rate()
        for name, section, flags in (("collect", self.config.calibration, "--num-prompts/--steps/--resolution"),
                                     ("validate", self.config.validation,
                                      "--val-prompts/--val-steps/--val-resolution")):
            if name not in todo:
                continue
            protocol = self.adapter.protocol
            steps, resolution = section.steps or protocol.steps, section.resolution or protocol.resolution
            guidance = protocol.guidance if section.guidance is None else section.guidance
            tokens = (resolution // multiple) ** 2 + text_tokens
            per_pass = 2 * params * tokens + 4 * tokens**2 * width * len(self.blocks)  # linears + attention
            generations = section.num_prompts * (1 + len(getattr(section, "baselines", ())) + 1) \
                if name == "validate" else section.num_prompts  # validate: 16-bit, quantized, baselines
            seconds = per_pass * steps * self.adapter.passes_per_step(guidance) * generations / rate
            if seconds > 60:
                span = f"{seconds / 3600:.1f} h" if seconds > 7200 else f"{seconds / 60:.0f} min"
                say(f"{name}: about {span} on this CPU (estimated: {section.num_prompts} prompts × {steps} steps at "
                    f"{resolution} px); size it with {flags}")


@dataclass
class Stage:
    """One stage: the config fields it reads, the stages it reads from, and its body. A stage that
    ``keeps_previous`` artifacts (the export) leaves a changed config's earlier files in place; one that does not
    ``apply`` to the config's method (smoothing and SVD for vector quantization) is recorded as such."""

    name: str
    inputs: tuple[str, ...]
    reads: Callable[[RunConfig], dict]
    body: Callable[[Run, Workspace], dict | None]
    keeps_previous: bool = False
    applies: Callable[[RunConfig], bool] = lambda _config: True  # noqa: E731 (False: recorded "not applicable")


def _cpu_flop_rate() -> float:
    """This CPU's float32 matmul rate now, from a quick measurement (for cost notices only)."""
    a = torch.randn(384, 384)
    start = time.perf_counter()
    for _ in range(8):
        a @ a
    return 8 * 2 * 384**3 / max(time.perf_counter() - start, 1e-6)


def registry() -> dict[str, Stage]:
    from . import collect, export, quantize, smooth, svd, validate

    stages = {module.STAGE.name: module.STAGE for module in (collect, smooth, svd, quantize, validate, export)}
    return {name: stages[name] for name in ORDER}


def stage_hash(stage: Stage, config: RunConfig, hashes: dict[str, str]) -> str:
    payload = {"stage": stage.name, "reads": stage.reads(config), "inputs": [hashes[i] for i in stage.inputs]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_stage_range(until: str | None, redo: str | None) -> None:
    """``--until``/``--redo`` name stages, and ``--redo`` does not lie past ``--until``.

    Raises:
        BadInputError: an unknown stage, or a redo that would be skipped.
    """
    for name in (until, redo):
        if name is not None and name not in ORDER:
            raise BadInputError(f"unknown stage {name!r} (stages: {', '.join(ORDER)})")
    if until is not None and redo is not None and ORDER.index(redo) > ORDER.index(until):
        raise BadInputError(f"--redo {redo} comes after --until {until}: it would never run")


def check_config(config: RunConfig, until: str | None = None, redo: str | None = None) -> str:
    """What can be checked of a config before a run directory is touched; returns the device to use.

    Stage names, the model family, the device (an explicit CUDA device that is not there is an error;
    ``auto`` without one says it runs on the CPU), and both prompt sets (unreadable or empty sets are errors;
    asking for more prompts than a set holds is said, not silently capped).

    Raises:
        BadInputError: any of the above.
    """
    from ..prompts import load_prompts

    check_stage_range(until, redo)
    get_adapter(config.family)
    device = resolve_device(config.device)
    if config.device == "auto" and device == "cpu":
        say("device: cpu (no CUDA device; pass --device cuda on a GPU machine)")
    for label, section in (("calibration", config.calibration), ("validation", config.validation)):
        available = len(load_prompts(section.prompts))
        if section.num_prompts > available:
            warn(f"{label} prompts: {section.prompts} holds {available}; using all {available}, "
                 f"not {section.num_prompts}")
    return device


def check_same_model(run: Run, config: RunConfig) -> None:
    """A run directory holds one model: another one there would discard its artifacts."""
    stored = run.manifest.get("config")
    if stored and (stored.get("model"), stored.get("family")) != (config.model, config.family):
        raise BadInputError(f"{run.path} holds a run of {stored.get('model')} ({stored.get('family')}), not "
                            f"{config.model}; choose another --out")


BLOCK_STAGES = ("collect", "smooth", "svd", "quantize")  # one artifact per block, written by the block's rank


def leader_only(stage: str, config: RunConfig) -> bool:
    """Whether rank 0 alone runs ``stage`` under torchrun: the export, and a validation through the emulated
    kernels (a CPU check whose per-layer figures would otherwise be sums over ranks)."""
    return stage == "export" or (stage == "validate" and config.validation.runtime == "emulated")


def run_stages(run: Run, config: RunConfig, until: str | None = None, redo: str | None = None,
               world: World | None = None) -> dict:
    """Run (or resume, or skip) every stage up to ``until``; returns a summary per stage.

    Everything that can be checked is checked before the first stage runs: stage names, the model in the
    run directory, and — once the model is loaded — the layers against the rank and group size and the
    resolutions against the model's patch size. In a distributed ``world`` every rank runs this with its own
    share of collect and of the per-block stages (``distributed.py``), after checking that all ranks agree on
    the config and on what is left to do; rank 0 alone updates the manifest, measures the validation and
    exports.

    Raises:
        BadInputError: unknown stage names, another model's run, ranks that disagree; and whatever the stages
            raise.
    """
    world = world or World()
    check_stage_range(until, redo)
    check_same_model(run, config)
    stages = registry()
    workspace = Workspace(config, run.path / "cache", world)
    hashes, todo = _stages_to_run(run, config, stages, until, redo)
    world.check_same({"config": config.to_dict(), "versions": library_versions(), "hashes": hashes, "todo": todo},
                     "config, library versions or view of the run")
    mine = [name for name in todo if world.leader or not leader_only(name, config)]
    error = None
    try:
        if mine:
            workspace.preflight(mine)
            workspace.encode_prompts(mine)
    except BadInputError as failure:
        if world.size == 1:
            raise
        error = str(failure)
    world.agree(error, "the checks before the first stage")
    if world.leader:
        run.set_config(config.to_dict(), library_versions())
        run.save()
    summary: dict[str, dict] = {name: {"status": "up to date", "seconds": 0.0} for name in hashes if name not in todo}
    for name in mine:
        start = time.perf_counter()
        done_before = _begin_stage(run, stages[name], hashes[name], redo) if world.leader else 0
        shared = workspace.stage_world(name).size > 1
        if shared:  # followers see rank 0's manifest: which blocks are done, the stage's seal
            world.barrier(f"the start of {name}")
            if not world.leader:
                run.reload()
        applies = stages[name].applies(config)
        say(f"{name}: {('resuming' if done_before else 'running') if applies else 'not applicable'}")
        extra = (stages[name].body(run, workspace) or {}) if applies else {"applies": False}
        if shared:
            world.barrier(f"the end of {name}")
        seconds = time.perf_counter() - start
        if world.leader:
            if shared and applies and name in BLOCK_STAGES:
                _adopt_blocks(run, name, len(workspace.blocks))
            run.finish_stage(name, seconds, **extra)
        status = ("resumed" if done_before else "done") if applies else "not applicable"
        summary[name] = {"status": status, "seconds": round(seconds, 3), **extra}
    return {name: summary[name] for name in hashes if name in summary}


ADOPT_WAIT = 30.0  # seconds: a network filesystem may show another machine's new files late


def _adopt_blocks(run: Run, stage: str, count: int) -> None:
    """Record the block artifacts the other ranks wrote (their seal and data verified); every block must be there.

    Raises:
        SvdqError: a block's artifact still missing after :data:`ADOPT_WAIT` seconds.
    """
    deadline = time.monotonic() + ADOPT_WAIT
    while True:
        run.adopt(stage)
        missing = [index for index in range(count) if not run.artifact_ok(stage, block_artifact(stage, index))]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SvdqError(f"{stage}: {len(missing)} block artifact(s) written by other ranks are not in {run.path} "
                            f"(first: {block_artifact(stage, missing[0])}); the run directory must be on a filesystem "
                            "every rank shares. Re-run the same command to resume")
        time.sleep(1.0)


def _stages_to_run(run: Run, config: RunConfig, stages: dict[str, Stage], until: str | None,
                   redo: str | None) -> tuple[dict[str, str], list[str]]:
    """Each stage's config hash up to ``until``, and the stages to run: the forced ones, those not done under
    their hash or with broken artifacts, and every one after them."""
    hashes: dict[str, str] = {}
    todo: list[str] = []
    last = ORDER.index(until) if until else len(ORDER) - 1
    for index, name in enumerate(ORDER[: last + 1]):
        hashes[name] = stage_hash(stages[name], config, hashes)
        forced = redo is not None and index >= ORDER.index(redo)
        if forced or todo or not run.is_current(name, hashes[name]) or run.broken_artifacts(name):
            todo.append(name)
    return hashes, todo


def _begin_stage(run: Run, stage: Stage, config_hash: str, redo: str | None) -> int:
    """Mark ``stage`` running in the manifest; returns how many of its artifacts are already done (a resume)."""
    name = stage.name
    if redo is not None and ORDER.index(name) >= ORDER.index(redo):
        run.stage(name)["hash"] = None
    for relative in run.broken_artifacts(name) if run.is_current(name, config_hash) else []:
        warn(f"{relative} is missing or does not match its checksum; recomputing it")
    resumed = run.begin_stage(name, config_hash, keep_previous=stage.keeps_previous)
    resumed = run.adopt(name) > 0 or resumed  # sealed files of this config the manifest did not list
    return sum(run.artifact_ok(name, r) for r in run.stage(name)["artifacts"]) if resumed else 0


def block_artifact(stage: str, index: int) -> str:
    return f"{stage}/block-{index:03d}.safetensors"


def for_each_block(run: Run, workspace: Workspace, stage: str,
                   compute: Callable[[int, str, list[list[str]]], tuple[dict, dict]]) -> None:
    """Compute and write one artifact per block of this rank's, skipping blocks already written and verified."""
    blocks = workspace.blocks
    mine = [index for index in range(len(blocks)) if workspace.world.owns(index)]
    with task(stage, len(mine)) as advance:
        for index in mine:
            block, groups = blocks[index]
            relative = block_artifact(stage, index)
            if not run.artifact_ok(stage, relative):
                # one thread: the weight side's numerics must not depend on the thread count
                with workspace.block_resident(index), single_threaded():
                    tensors, metadata = compute(index, block, groups)
                run.write(stage, relative, tensors, metadata)
                del tensors
                release_free_memory()
            advance(block)


def json_meta(values: dict[str, object]) -> dict[str, str]:
    """Safetensors metadata holds strings: one JSON document per key."""
    return {key: json.dumps(value, sort_keys=True) for key, value in values.items()}


def quant_fields(config: RunConfig, *names: str) -> dict[str, object]:
    values = config.quant.to_dict()
    return {name: values[name] for name in names}
