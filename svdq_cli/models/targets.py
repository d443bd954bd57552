"""What will be quantized, and why: a discovered layout under the run's quantization and the user's overrides.

Every linear of the denoiser gets one row: W4A4 (4-bit weights and activations, SVDQuant's low-rank branch),
weight-only (4-bit weights, 16-bit activations: the AdaLN modulation linears), or 16-bit with the reason —
outside the repeated blocks, not reached by a generation, skipped by an override, or an input width the
quantization's group (or vector) size does not divide, which falls back to 16 bits for that layer alone
instead of refusing the model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import BadInputError
from ..methods.config import QuantConfig
from .discovery import Layout


@dataclass(frozen=True)
class Overrides:
    """Glob patterns over full linear names (``single_transformer_blocks.*.proj_out``)."""

    skip: tuple[str, ...] = ()  # stay 16-bit
    weight_only: tuple[str, ...] = ()  # 4-bit weights, 16-bit activations


@dataclass(frozen=True)
class Target:
    name: str
    block: str | None
    in_features: int
    out_features: int
    mode: str  # "W4A4" (W8A8 for int8): weights and activations; "weight-only"; or "16-bit"
    reason: str
    group: int | None = None  # its group's index within the block: members share λ


def match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def check_overrides(overrides: Overrides, linears: Sequence[str]) -> None:
    """Each pattern must match a linear: a typo that matches nothing would silently quantize everything.

    Raises:
        BadInputError: a pattern that matches no linear of the model.
    """
    for label, patterns in (("skip", overrides.skip), ("weight_only", overrides.weight_only)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in linears):
                raise BadInputError(f"targets.{label} pattern {pattern!r} matches no linear layer of the model "
                                    "(`svdq targets MODEL` lists them)")


def plan_targets(layout: Layout, model: nn.Module, quant: QuantConfig,
                 overrides: Overrides = Overrides()) -> tuple[Layout, list[Target]]:
    """The layout the run quantizes (``layout`` less the layers that stay 16-bit, the overrides' weight-only
    ones added) and a row for every linear of ``model``."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    check_overrides(overrides, list(modules))
    width, what = (quant.vq_dim, "vector dimension") if quant.is_vector else (quant.group_size, "group size")
    weight_only = set(layout.weight_only) | {n for n in layout.targets if match(n, overrides.weight_only)}
    kept, rows, blocks = dict(layout.kept), [], []
    for block, groups in layout.blocks:
        remaining = []
        for group in groups:
            members = []
            for name in group:
                if match(name, overrides.skip):
                    kept[name] = "skipped by targets.skip"
                elif modules[name].in_features % width:
                    kept[name] = f"in_features {modules[name].in_features} is not a multiple of the {what} {width}"
                else:
                    members.append(name)
            if members:
                remaining.append(members)
        blocks.append((block, remaining))
        for index, members in enumerate(remaining):
            for name in members:
                only = quant.weight_only or quant.is_vector or name in weight_only
                rows.append(_row(name, block, modules[name], "weight-only" if only else _label(quant),
                                 _why(name, only, layout, quant), index))
    for name, reason in kept.items():
        block = next((b for b, _ in layout.blocks if name.startswith(f"{b}.")), None)
        rows.append(_row(name, block, modules[name], "16-bit", reason, None))
    order = {name: i for i, name in enumerate(modules)}
    rows.sort(key=lambda row: order[row.name])
    planned = Layout(blocks, frozenset(weight_only & {r.name for r in rows if r.mode == "weight-only"}),
                     layout.nonnegative, kept)
    return planned, rows


def _label(quant: QuantConfig) -> str:
    bits = 8 if quant.precision == "int8" else 4
    return f"W{bits}A{bits}"


def _why(name: str, weight_only: bool, layout: Layout, quant: QuantConfig) -> str:
    if not weight_only:
        return "reads a non-negative input (after GELU)" if name in layout.nonnegative else "reads token activations"
    if name in layout.weight_only:
        return "reads one vector per sample (modulation)"
    if quant.weight_only or quant.is_vector:
        return f"{quant.method} quantizes weights only"
    return "weight-only by targets.weight_only"


def _row(name, block, module: nn.Linear, mode: str, reason: str, group: int | None) -> Target:
    return Target(name, block, module.in_features, module.out_features, mode, reason, group)


def fallback_warning(rows: Sequence[Target]) -> str | None:
    """One line counting the layers the group size left in 16 bits, or None."""
    narrow = [row for row in rows if row.reason.startswith("in_features")]
    if not narrow:
        return None
    return (f"{len(narrow)} linear layer(s) stay 16-bit: their input width is not a multiple of the group size "
            f"(first: {narrow[0].name}, {narrow[0].reason.split(' is ')[0]})")
