"""smooth: per input group, the activation mode (signed, unsigned + shift, 16-bit) and the α/β grid search
for λ with the low-rank branch and 4-bit quantization in the loop."""

from __future__ import annotations

import json

import torch

from ..engines.uniform import GroupPlan, plan_group
from ..quant.statistics import InputStats
from ..system.threads import parallel_map
from .base import Stage, block_artifact, for_each_block, json_meta, quant_fields


def reads(config) -> dict:
    return quant_fields(config, "method", "precision", "weight_only", "rank", "alphas", "search_rows",
                        "search_channels", "scale_dtype", "seed", "exact_svd_max_elements", "full_range", "search",
                        "act_range")


def group_stats(tensors: dict[str, torch.Tensor], owner: str) -> InputStats:
    prefix = f"{owner}."
    return InputStats.from_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def load_plans(run, index: int) -> dict[str, GroupPlan]:
    """The group plans of block ``index`` (keyed by the group's first layer)."""
    tensors, metadata = run.read("smooth", block_artifact("smooth", index))
    plans = {}
    for owner, text in metadata.items():
        fields = json.loads(text)
        plans[owner] = GroupPlan(fields["act"], fields["shift"], fields["alpha"], fields["beta"],
                                 tensors.get(f"{owner}.smooth"))
    return plans


def run(run, workspace) -> None:
    config = workspace.config

    def compute(index: int, block: str, groups: list[list[str]]):
        collected, _ = run.read("collect", block_artifact("collect", index))

        def plan(group: list[str]) -> GroupPlan:
            owner = group[0]
            return plan_group(group, [workspace.originals[n] for n in group], group_stats(collected, owner),
                              config.quant, weight_only=[owner] if owner in workspace.layout.weight_only else (),
                              nonnegative=[owner] if owner in workspace.layout.nonnegative else ())

        tensors, metadata = {}, {}
        for group, chosen in zip(groups, parallel_map(plan, groups), strict=True):
            owner = group[0]
            if chosen.smooth is not None:
                tensors[f"{owner}.smooth"] = chosen.smooth
            metadata[owner] = {"act": chosen.act, "shift": chosen.shift, "alpha": chosen.alpha, "beta": chosen.beta}
        return tensors, json_meta(metadata)

    for_each_block(run, workspace, "smooth", compute)


STAGE = Stage("smooth", ("collect",), reads, run, applies=lambda config: not config.quant.is_vector)
