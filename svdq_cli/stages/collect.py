"""collect: run the 16-bit pipeline over the calibration prompts and record, per input group, the running
per-channel min/max and block-diagonal Gram over all tokens and a bounded seeded sample of rows across
timesteps (plus the GPTQ Hessian when GPTQ is on). Memory is bounded by ``calib_rows`` per group, whatever
the prompts × steps.

VQ methods record something else: per block, a bounded seeded sample of its input calls (calibration/block_inputs.py),
for block-wise calibration.

One pass feeds every block, so an interrupted collect starts over; it is deterministic, so the per-block
files it writes are the same either way. Under torchrun each rank runs its share of the prompts and the ranks
merge their statistics exactly (``distributed.py``); each writes the artifacts of its own blocks.
"""

from __future__ import annotations

import shutil

from ..calibration.block_inputs import BlockInputSampler, smallest_calls
from ..calibration.block_inputs import block_artifact as block_inputs_artifact
from ..calibration.collector import SAMPLES, collect_statistics
from ..calibration.prompts import prompt_seed
from ..system.progress import say, task
from .base import Stage, block_artifact, json_meta

# 2: block-diagonal Gram over every token (older artifacts lack it); 3: statistics gathered per prompt and merged in
# prompt order, float64 sample keys (the same bits on any number of ranks); 4: each input's row sample seeded by its
# layer's name, not its position (discovery orders groups by call). Older artifacts are collected again.
STATISTICS_VERSION = 4


def reads(config) -> dict:
    quant = config.quant
    common = {"model": config.model, "family": config.family, "dtype": config.dtype,
              "calibration": config.to_dict()["calibration"], "targets": config.to_dict()["targets"]}
    if quant.is_vector:  # VQ calibrates blocks on their sampled inputs, not on per-layer statistics
        return {**common, "block_inputs": {"vq_calls": quant.vq_calls, "seed": quant.seed}}
    return {**common, "quant": {"calib_rows": quant.calib_rows, "gptq": quant.gptq, "seed": quant.seed},
            "statistics": STATISTICS_VERSION}


def run(run, workspace) -> dict:
    config, world = workspace.config, workspace.world
    calibration = config.calibration
    prompts, mine = workspace.calibration_prompts()
    steps, _, resolution = workspace.settings(calibration)
    summary = {"prompts": len(prompts), "steps": steps, "resolution": resolution}
    missing = [i for i in range(len(workspace.blocks)) if not run.artifact_ok("collect", block_artifact("collect", i))]
    if not missing:  # every block's statistics verify (adopted after a lost manifest): no calibration pass
        return summary
    if config.quant.is_vector:
        return {**summary, **collect_block_inputs(run, workspace, prompts, mine, missing)}
    encodings = dict(zip(mine, workspace.encodings([prompts[i] for i in mine], calibration), strict=True))
    groups = [group for _, block_groups in workspace.blocks for group in block_groups]

    with task("collect", len(mine)) as advance:
        def calibrate(_transformer, unit: int) -> None:
            denoise(workspace, prompts[unit], encodings[unit])
            advance(prompts[unit][:40])

        result = collect_statistics(workspace.denoiser, workspace.originals, calibrate, config.quant, groups,
                                    units=len(prompts), world=world)
    for index in missing:
        if not world.owns(index):
            continue
        block_groups = workspace.blocks[index][1]
        tensors, members = {}, {}
        for group in block_groups:
            owner = group[0]
            members[owner] = group
            tensors.update({f"{owner}.{key}": value for key, value in result.stats[owner].state().items()})
        run.write("collect", block_artifact("collect", index), tensors, json_meta({"members": members}))
    if world.size > 1:  # bytes every rank contributed: per-prompt sums every round, row samples once
        sent = world.exchange(dict(world.sent), "the exchange tally")
        summary["exchanged_bytes"] = sum(sum(tally.values()) for tally in sent)
        summary["exchanged_sample_bytes"] = sum(tally.get(SAMPLES, 0) for tally in sent)
        say(f"collect: the {world.size} ranks exchanged {summary['exchanged_bytes'] / 1e6:.1f} MB of statistics")
    return summary


def denoise(workspace, prompt: str, encoding) -> None:
    """One calibration generation of ``prompt`` (its own seed, latents out: the VAE decode is not needed)."""
    calibration = workspace.config.calibration
    workspace.generate_one(prompt, prompt_seed(prompt, calibration.seed), encoding, calibration, output_type="latent")


def collect_block_inputs(run, workspace, prompts: list[str], mine: list[int], missing: list[int]) -> dict:
    """VQ methods: run the 16-bit pipeline over this rank's prompts and keep, per block, a seeded sample of
    ``vq_calls`` of its input calls (``calibration/block_inputs.py``); the ranks exchange which calls they kept
    (keys and spill files on the shared run directory) and each writes the artifacts of its own blocks."""
    calibration, quant, world = workspace.config.calibration, workspace.config.quant, workspace.world
    modules = [workspace.denoiser.get_submodule(name) for name, _ in workspace.blocks]
    spill = run.path / "collect" / "calls.partial"
    sampler = BlockInputSampler(modules, quant.vq_calls, quant.seed, spill / f"rank-{world.rank}")
    encodings = workspace.encodings([prompts[index] for index in mine], calibration)
    try:
        with task("collect", len(mine)) as advance, sampler.recording():
            for unit, encoding in zip(mine, encodings, strict=True):
                sampler.start_unit(unit)
                denoise(workspace, prompts[unit], encoding)
                advance(prompts[unit][:40])
        shares = world.exchange(sampler.kept_calls(), "the exchange of sampled block inputs")
        for index in missing:
            if world.owns(index):
                calls = smallest_calls([share[index] for share in shares], quant.vq_calls)
                run.write("collect", block_artifact("collect", index), *block_inputs_artifact(calls))
        world.barrier("the writing of the block inputs")  # every rank has read the spill files it needs
    finally:
        sampler.discard()
    if world.leader:
        shutil.rmtree(spill, ignore_errors=True)
    return {"block_inputs": quant.vq_calls}


STAGE = Stage("collect", (), reads, run)
