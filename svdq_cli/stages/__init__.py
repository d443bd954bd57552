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
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from ..errors import BadInputError
from ..models import Adapter, get_adapter
from ..progress import say, task, warn
from ..recipe import RunConfig
from ..run import FAULT_VARIABLE, Run, library_versions  # noqa: F401 (FAULT_VARIABLE: for tests)

ORDER = ("collect", "smooth", "svd", "quantize", "validate", "export")


class Workspace:
    """What the stages of one process share: the config, the adapter and the lazily loaded 16-bit model."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.adapter: Adapter = get_adapter(config.family)
        self.dtype = getattr(torch, config.dtype)

    @cached_property
    def pipeline(self):
        from ..models.loading import load_pipeline

        say(f"loading {self.config.model} ({self.config.dtype}, {self.config.device})")
        return load_pipeline(self.config.model, self.adapter, self.dtype, self.config.device, self.config.offload)

    @property
    def transformer(self) -> nn.Module:
        return self.pipeline.transformer

    @cached_property
    def blocks(self) -> list[tuple[str, list[list[str]]]]:
        """``[(block name, groups of linear names)]`` found by the adapter."""
        return self.adapter.block_groups(self.transformer)

    @cached_property
    def originals(self) -> dict[str, nn.Linear]:
        """Every target linear of the 16-bit transformer, captured before any swap."""
        modules = dict(self.transformer.named_modules())
        return {name: modules[name] for _, groups in self.blocks for group in groups for name in group}

    def check_group_size(self) -> None:
        group = self.config.quant.group_size
        for name, module in self.originals.items():
            if module.in_features % group:
                raise BadInputError(f"layer {name}: in_features {module.in_features} is not divisible by {group}")
            rank = self.config.quant.effective_rank
            if rank > min(module.in_features, module.out_features):
                raise BadInputError(f"--rank {rank} exceeds layer {name} "
                                    f"(min(in, out) = {min(module.in_features, module.out_features)})")


@dataclass
class Stage:
    """One stage: the config fields it reads, the stages it reads from, and its body."""

    name: str
    inputs: tuple[str, ...]
    reads: Callable[[RunConfig], dict]
    body: Callable[[Run, Workspace], dict | None]


def registry() -> dict[str, Stage]:
    from . import collect, export, quantize, smooth, svd, validate

    stages = {module.STAGE.name: module.STAGE for module in (collect, smooth, svd, quantize, validate, export)}
    return {name: stages[name] for name in ORDER}


def stage_hash(stage: Stage, config: RunConfig, hashes: dict[str, str]) -> str:
    payload = {"stage": stage.name, "reads": stage.reads(config), "inputs": [hashes[i] for i in stage.inputs]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_stages(run: Run, config: RunConfig, until: str | None = None, redo: str | None = None) -> dict:
    """Run (or resume, or skip) every stage up to ``until``; returns a summary per stage.

    Raises:
        BadInputError: unknown stage names; and whatever the stages raise.
    """
    for name in (until, redo):
        if name is not None and name not in ORDER:
            raise BadInputError(f"unknown stage {name!r} (stages: {', '.join(ORDER)})")
    stages = registry()
    workspace = Workspace(config)
    run.set_config(config.to_dict(), library_versions())
    run.save()
    hashes: dict[str, str] = {}
    summary: dict[str, dict] = {}
    last = ORDER.index(until) if until else len(ORDER) - 1
    for index, name in enumerate(ORDER[: last + 1]):
        stage = stages[name]
        hashes[name] = stage_hash(stage, config, hashes)
        forced = redo is not None and index >= ORDER.index(redo)
        if forced:
            run.stage(name)["hash"] = None
        broken = run.broken_artifacts(name) if run.is_current(name, hashes[name]) else []
        if run.is_current(name, hashes[name]) and not broken:
            summary[name] = {"status": "up to date", "seconds": 0.0}
            continue
        for relative in broken:
            warn(f"{relative} is missing or does not match its checksum; recomputing it")
        if name != "collect" and name != "export":
            workspace.check_group_size()
        start = time.perf_counter()
        resumed = run.begin_stage(name, hashes[name])
        done_before = sum(run.artifact_ok(name, r) for r in run.stage(name)["artifacts"]) if resumed else 0
        say(f"{name}: {'resuming' if done_before else 'running'}")
        extra = stage.body(run, workspace) or {}
        seconds = time.perf_counter() - start
        run.finish_stage(name, seconds, **extra)
        summary[name] = {"status": "resumed" if done_before else "done", "seconds": round(seconds, 3), **extra}
    return summary


def block_artifact(stage: str, index: int) -> str:
    return f"{stage}/block-{index:03d}.safetensors"


def for_each_block(run: Run, workspace: Workspace, stage: str,
                   compute: Callable[[int, str, list[list[str]]], tuple[dict, dict]]) -> None:
    """Compute and write one artifact per block, skipping blocks already written and verified."""
    blocks = workspace.blocks
    with task(stage, len(blocks)) as advance:
        for index, (block, groups) in enumerate(blocks):
            relative = block_artifact(stage, index)
            if not run.artifact_ok(stage, relative):
                tensors, metadata = compute(index, block, groups)
                run.write(stage, relative, tensors, metadata)
            advance(block)


def json_meta(values: dict[str, object]) -> dict[str, str]:
    """Safetensors metadata holds strings: one JSON document per key."""
    return {key: json.dumps(value, sort_keys=True) for key, value in values.items()}


def quant_fields(config: RunConfig, *names: str) -> dict[str, object]:
    values = config.quant.to_dict()
    return {name: values[name] for name in names}
