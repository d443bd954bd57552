"""plan_targets: every linear gets a mode and a reason; widths the group does not divide fall back alone."""

from __future__ import annotations

import pytest
import torch

from svdq_cli.errors import BadInputError
from svdq_cli.methods.config import QuantConfig
from svdq_cli.models.discovery import trace_layout
from svdq_cli.models.targets import Overrides, fallback_warning, plan_targets
from tests.models.test_discovery import Toy


def toy_layout(width: int):
    toy = Toy(width)
    layout = trace_layout(Toy(width).to("meta"), (torch.randn(2, 5, width),), {"temb": torch.randn(2, width)})
    return toy, layout


def test_a_width_the_group_does_not_divide_stays_16_bit_for_that_layer_alone():
    toy, layout = toy_layout(96)  # every input is 96 wide except the MLP's down projection (192)
    planned, rows = plan_targets(layout, toy, QuantConfig(precision="int4"))
    assert planned.targets == ["blocks.0.down", "blocks.1.down"]
    modes = {row.name: (row.mode, row.reason) for row in rows}
    assert modes["blocks.0.down"] == ("W4A4", "reads a non-negative input (after GELU)")
    assert modes["blocks.0.q"] == ("16-bit", "in_features 96 is not a multiple of the group size 64")
    assert len(rows) == sum(isinstance(m, torch.nn.Linear) for m in toy.modules())
    assert fallback_warning(rows).startswith("14 linear layer(s) stay 16-bit")
    nvfp4, rows = plan_targets(layout, toy, QuantConfig(precision="nvfp4"))  # group 16 divides 96
    assert len(nvfp4.targets) == 16 and fallback_warning(rows) is None


def test_overrides_skip_and_make_weight_only_by_glob_and_a_pattern_matching_nothing_is_refused():
    toy, layout = toy_layout(64)
    overrides = Overrides(skip=("blocks.1.*",), weight_only=("*.up",))
    planned, rows = plan_targets(layout, toy, QuantConfig(), overrides)
    assert not any(name.startswith("blocks.1.") for name in planned.targets)
    assert planned.weight_only == {"blocks.0.mod_a", "blocks.0.mod_b", "blocks.0.mod_raw", "blocks.0.up"}
    reasons = {row.name: row.reason for row in rows}
    assert reasons["blocks.1.q"] == "skipped by targets.skip"
    assert reasons["blocks.0.up"] == "weight-only by targets.weight_only"
    with pytest.raises(BadInputError, match=r"targets.skip pattern 'blocks.9.\*' matches no linear layer"):
        plan_targets(layout, toy, QuantConfig(), Overrides(skip=("blocks.9.*",)))
