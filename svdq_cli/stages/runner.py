"""Running the stages: what can be checked before a run directory is touched, which stages are out of date,
and the loop that runs, resumes or skips each one (under torchrun, each rank with its share)."""

from __future__ import annotations

import dataclasses
import time

from ..calibration.prompts import load_prompts
from ..errors import BadInputError, SvdqError
from ..models.loading import adapter_of
from ..run.directory import FAULT_VARIABLE, Run, library_versions  # noqa: F401 (FAULT_VARIABLE: for tests)
from ..run.recipe import RunConfig
from ..system.device import resolve_device
from ..system.distributed import World
from ..system.progress import say, warn
from . import collect, export, quantize, smooth, svd, validate
from .base import BLOCK_STAGES, ORDER, Stage, block_artifact, leader_only, stage_hash
from .workspace import Workspace


def registry() -> dict[str, Stage]:
    stages = {module.STAGE.name: module.STAGE for module in (collect, smooth, svd, quantize, validate, export)}
    return {name: stages[name] for name in ORDER}


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
    check_stage_range(until, redo)
    adapter_of(config.family, config.model, config.pipeline_args)
    device = resolve_device(config.device)
    if config.device == "auto" and device == "cpu":
        say("device: cpu (no CUDA device; pass --device cuda on a GPU machine)")
    for label, section in (("calibration", config.calibration), ("validation", config.validation)):
        available = len(load_prompts(section.prompts))
        if section.num_prompts > available:
            warn(f"{label} prompts: {section.prompts} holds {available}; using all {available}, "
                 f"not {section.num_prompts}")
    return device


def on_this_device(config: RunConfig) -> RunConfig:
    """The config a fresh run computes with here: a recipe's float16 on a CPU runs in float32, said in one line
    (torch's CPU kernels are slow in half precision and some models fail in it: SD3's convolutions meet a
    float32 bias)."""
    if config.dtype == "float16" and resolve_device(config.device) == "cpu":
        say("dtype: float16 runs in float32 on the CPU (--dtype bfloat16 takes half the memory)")
        return dataclasses.replace(config, dtype="float32")
    return config


def check_same_model(run: Run, config: RunConfig) -> None:
    """A run directory holds one model: another one there would discard its artifacts."""
    stored = run.manifest.get("config")
    if stored and (stored.get("model"), stored.get("family")) != (config.model, config.family):
        raise BadInputError(f"{run.path} holds a run of {stored.get('model')} ({stored.get('family')}), not "
                            f"{config.model}; choose another --out")


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


def stages_to_do(run: Run, config: RunConfig, until: str) -> list[str]:
    """The stages up to ``until`` that are not done under ``config`` (or have broken artifacts)."""
    return _stages_to_run(run, config, registry(), until, None)[1]


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
