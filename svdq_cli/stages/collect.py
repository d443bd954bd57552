"""collect: run the 16-bit pipeline over the calibration prompts and record, per input group, the running
per-channel min/max and block-diagonal Gram over all tokens and a bounded seeded sample of rows across
timesteps (plus the GPTQ Hessian when GPTQ is on). Memory is bounded by ``calib_rows`` per group, whatever
the prompts × steps.

One pass feeds every block, so an interrupted collect starts over; it is deterministic, so the per-block
files it writes are the same either way.
"""

from __future__ import annotations

from ..api import collect_statistics
from ..prompts import load_prompts, prompt_seed
from . import Stage, block_artifact, json_meta

STATISTICS_VERSION = 2  # 2: block-diagonal Gram over every token (older artifacts lack it: collected again)


def reads(config) -> dict:
    quant = config.quant
    return {
        "model": config.model, "family": config.family, "dtype": config.dtype,
        "calibration": config.to_dict()["calibration"],
        "quant": {"calib_rows": quant.calib_rows, "gptq": quant.gptq, "seed": quant.seed},
        "statistics": STATISTICS_VERSION,
    }


def run(run, workspace) -> dict:
    config = workspace.config
    calibration = config.calibration
    prompts = load_prompts(calibration.prompts, calibration.num_prompts)
    steps, _, resolution = workspace.settings(calibration)
    groups = [group for _, block_groups in workspace.blocks for group in block_groups]
    missing = [i for i in range(len(workspace.blocks)) if not run.artifact_ok("collect", block_artifact("collect", i))]
    if not missing:  # every block's statistics verify (adopted after a lost manifest): no calibration pass
        return {"prompts": len(prompts), "steps": steps, "resolution": resolution}

    def calibrate(_transformer) -> None:
        seeds = [prompt_seed(prompt, calibration.seed) for prompt in prompts]
        workspace.generate(prompts, seeds, calibration, output_type="latent", progress="collect")

    result = collect_statistics(workspace.transformer, workspace.originals, calibrate, config.quant, groups)
    for index in missing:
        block_groups = workspace.blocks[index][1]
        tensors, members = {}, {}
        for group in block_groups:
            owner = group[0]
            members[owner] = group
            tensors.update({f"{owner}.{key}": value for key, value in result.stats[owner].state().items()})
        run.write("collect", block_artifact("collect", index), tensors, json_meta({"members": members}))
    return {"prompts": len(prompts), "steps": steps, "resolution": resolution}


STAGE = Stage("collect", (), reads, run)
