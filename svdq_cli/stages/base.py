"""What every stage shares: the :class:`Stage` record, its config hash, and the per-block artifacts.

The pipeline is collect → smooth → svd → quantize → validate → export (DESIGN.md §3–§4). Each stage declares
the config fields it reads and the stages it reads from; its hash covers both, so a changed field re-runs that
stage and those after it, nothing before. Stages that work per block write one
artifact per transformer block, so an interrupted stage continues at the next block; a finished stage whose
artifacts verify is skipped; a missing or altered artifact is recomputed with a warning naming it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..models.streaming import release_free_memory
from ..run.directory import Run
from ..run.recipe import RunConfig
from ..system.progress import task
from ..system.threads import single_threaded

ORDER = ("collect", "smooth", "svd", "quantize", "validate", "export")


@dataclass
class Stage:
    """One stage: the config fields it reads, the stages it reads from, and its body. A stage that
    ``keeps_previous`` artifacts (the export) leaves a changed config's earlier files in place; one that does not
    ``apply`` to the config's method (smoothing and SVD for vector quantization) is recorded as such."""

    name: str
    inputs: tuple[str, ...]
    reads: Callable[[RunConfig], dict]
    body: Callable[[Run, Any], dict | None]  # (run, workspace)
    keeps_previous: bool = False
    applies: Callable[[RunConfig], bool] = lambda _config: True  # noqa: E731 (False: recorded "not applicable")


def stage_hash(stage: Stage, config: RunConfig, hashes: dict[str, str]) -> str:
    payload = {"stage": stage.name, "reads": stage.reads(config), "inputs": [hashes[i] for i in stage.inputs]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


BLOCK_STAGES = ("collect", "smooth", "svd", "quantize")  # one artifact per block, written by the block's rank


def leader_only(stage: str, config: RunConfig) -> bool:
    """Whether rank 0 alone runs ``stage`` under torchrun: the export, and a validation through the emulated
    kernels (a CPU check whose per-layer figures would otherwise be sums over ranks)."""
    return stage == "export" or (stage == "validate" and config.validation.runtime == "emulated")


def block_artifact(stage: str, index: int) -> str:
    return f"{stage}/block-{index:03d}.safetensors"


def for_each_block(run: Run, workspace, stage: str,
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


# Fields added after runs existed, hashed only when set: a run made before keeps its stages' hashes.
LATER_DEFAULTS = {"act_range": "svdq"}


def quant_fields(config: RunConfig, *names: str) -> dict[str, object]:
    values = config.quant.to_dict()
    return {name: values[name] for name in names if name not in LATER_DEFAULTS or values[name] != LATER_DEFAULTS[name]}
