"""svd: the low-rank branch of every smoothed weight (top-r SVD, optionally refined)."""

from __future__ import annotations

import torch

from ..quant.svdquant import branch_factors
from . import Stage, for_each_block, quant_fields
from .smooth import load_plans


def reads(config) -> dict:
    return quant_fields(config, "method", "rank", "lowrank_iters", "exact_svd_max_elements", "precision",
                        "scale_dtype", "seed", "full_range")


def run(run, workspace) -> None:
    config = workspace.config

    def compute(index: int, block: str, groups: list[list[str]]):
        plans = load_plans(run, index)
        tensors = {}
        for group in groups:
            plan = plans[group[0]]
            for name in group:
                module = workspace.originals[name]
                smooth = plan.smooth if plan.smooth is not None else torch.ones(module.in_features)
                down, up = branch_factors(module.weight, smooth, config.quant, module.weight.dtype)
                tensors[f"{name}.lora_down"], tensors[f"{name}.lora_up"] = down, up
        return tensors, {}

    for_each_block(run, workspace, "svd", compute)


STAGE = Stage("svd", ("smooth",), reads, run)
