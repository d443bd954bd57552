"""svd: the low-rank branch of every smoothed weight (top-r SVD, optionally refined)."""

from __future__ import annotations

import torch

from ..quant.svdquant import branch_factors
from ..system.threads import parallel_map
from .base import Stage, for_each_block, quant_fields
from .smooth import load_plans


def reads(config) -> dict:
    return quant_fields(config, "method", "rank", "lowrank_iters", "exact_svd_max_elements", "precision",
                        "scale_dtype", "seed", "full_range", "act_range")


def run(run, workspace) -> None:
    config = workspace.config

    def compute(index: int, block: str, groups: list[list[str]]):
        plans = load_plans(run, index)
        owners = {name: group[0] for group in groups for name in group}

        def factors(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            module, plan = workspace.originals[name], plans[owners[name]]
            smooth = plan.smooth if plan.smooth is not None else torch.ones(module.in_features)
            return branch_factors(module.weight, smooth, config.quant, module.weight.dtype,
                                  config.quant.rank_for(plan.act))

        tensors = {}
        for name, (down, up) in zip(owners, parallel_map(factors, owners), strict=True):
            tensors[f"{name}.lora_down"], tensors[f"{name}.lora_up"] = down, up
        return tensors, {}

    for_each_block(run, workspace, "svd", compute)


STAGE = Stage("svd", ("smooth",), reads, run, applies=lambda config: not config.quant.is_vector)
