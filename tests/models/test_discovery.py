"""Discovery finds, from structure and one traced call, what a person reading each model would list."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svdq_cli.models.discovery import DiscoveryError, Layout, block_paths, capture_call, trace_layout
from svdq_cli.models.registry import ADAPTERS

JOINT = [{"attn.to_q", "attn.to_k", "attn.to_v"}, {"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"},
         {"attn.to_out.0"}, {"attn.to_add_out"}, {"ff.net.0.proj"}, {"ff.net.2"}, {"ff_context.net.0.proj"},
         {"ff_context.net.2"}, {"norm1.linear", "norm1_context.linear"}]
CROSS = [{"attn1.to_q", "attn1.to_k", "attn1.to_v"}, {"attn1.to_out.0"}, {"attn2.to_q"}, {"attn2.to_k", "attn2.to_v"},
         {"attn2.to_out.0"}]
JOINT_MODULATION, JOINT_GELU = {"norm1.linear", "norm1_context.linear"}, {"ff.net.2", "ff_context.net.2"}
EXPECTED = {  # family: {block: (groups, weight-only linears, non-negative ones)}, relative to the block
    "tiny-flux": {
        "transformer_blocks.1": (JOINT, JOINT_MODULATION, JOINT_GELU),
        "single_transformer_blocks.3": (
            [{"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"}, {"proj_out"}, {"norm.linear"}], {"norm.linear"},
            set()),  # proj_out reads [attention, gelu(mlp)] concatenated: not non-negative
    },
    "tiny-sd3": {
        "transformer_blocks.0": (JOINT, JOINT_MODULATION, JOINT_GELU),
        "transformer_blocks.2": (  # the last block's context stream ends after attention
            [g for g in JOINT if not g & {"attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"}],
            JOINT_MODULATION, {"ff.net.2"}),
    },
    "tiny-pixart": {"transformer_blocks.0": ([*CROSS, {"ff.net.0.proj"}, {"ff.net.2"}], set(), {"ff.net.2"})},
    "tiny-sana": {"transformer_blocks.2": (CROSS, set(), set())},  # its MLP is convolutional
    "tiny-dit": {"transformer_blocks.0": (
        [{"norm1.emb.timestep_embedder.linear_1"}, {"norm1.emb.timestep_embedder.linear_2"}, {"norm1.linear"},
         {"attn1.to_q", "attn1.to_k", "attn1.to_v"}, {"attn1.to_out.0"}, {"ff.net.0.proj"}, {"ff.net.2"}],
        {"norm1.linear", "norm1.emb.timestep_embedder.linear_1", "norm1.emb.timestep_embedder.linear_2"},
        {"ff.net.2"})},
}


def relative(names, block: str) -> set[str]:
    return {name.removeprefix(f"{block}.") for name in names if name.startswith(f"{block}.")}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_discovery_finds_each_familys_groups_modulation_and_gelu_inputs(family):
    adapter = ADAPTERS[family]
    pipeline = adapter.build_tiny(0)
    layout = adapter.discover(pipeline)
    assert [block for block, _ in layout.blocks] == block_paths(pipeline.transformer)
    found = dict(layout.blocks)
    for block, (groups, weight_only, nonnegative) in EXPECTED[family].items():
        assert sorted(map(sorted, (relative(g, block) for g in found[block]))) == sorted(map(sorted, groups))
        assert relative(layout.weight_only, block) == weight_only
        assert relative(layout.nonnegative, block) == nonnegative
    linears = {name for name, module in pipeline.transformer.named_modules() if isinstance(module, nn.Linear)}
    assert set(layout.targets) | set(layout.kept) == linears and not set(layout.targets) & set(layout.kept)
    assert set(layout.kept.values()) == {"outside the repeated blocks (embedding or output)"}


class Block(nn.Module):
    """q/k/v on one input, two modulation linears on silu(temb) (computed twice), one on temb itself, a GELU
    MLP and a linear the forward never calls."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.mod_a, self.mod_b, self.mod_raw = (nn.Linear(width, width) for _ in range(3))
        self.act_a, self.act_b = nn.SiLU(), nn.SiLU()
        self.up, self.gelu, self.down = nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        self.unused = nn.Linear(width, width)

    def forward(self, x, temb):
        shift = self.mod_a(self.act_a(temb)) + self.mod_b(self.act_b(temb)) + self.mod_raw(temb)
        x = x + self.q(x) * self.k(x) + self.v(x) + shift[:, None]
        return x + self.down(self.gelu(self.up(x)))


class Toy(nn.Module):
    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.heads = nn.ModuleList(nn.Linear(width, width) for _ in range(2))  # linears, not blocks
        self.out = nn.Linear(width, width)

    def forward(self, hidden_states, temb):
        x = self.embed(hidden_states)
        for block in self.blocks:
            x = block(x, temb)
        return self.out(x)


def test_the_trace_groups_by_input_and_tells_modulation_gelu_and_unreached_linears_apart():
    toy = Toy()
    args = (torch.randn(2, 5, 8),)
    layout = trace_layout(toy.to("meta"), args, {"temb": torch.randn(2, 8)})
    assert block_paths(toy) == ["blocks.0", "blocks.1"]
    block, groups = layout.blocks[1]
    assert block == "blocks.1"
    assert [relative(g, block) for g in groups] == [{"mod_a", "mod_b"}, {"mod_raw"}, {"q", "k", "v"}, {"up"},
                                                   {"down"}]
    assert relative(layout.weight_only, block) == {"mod_a", "mod_b", "mod_raw"}
    assert relative(layout.nonnegative, block) == {"down"}
    assert layout.kept == {"embed": "outside the repeated blocks (embedding or output)",
                           "heads.0": "outside the repeated blocks (embedding or output)",
                           "heads.1": "outside the repeated blocks (embedding or output)",
                           "out": "outside the repeated blocks (embedding or output)",
                           "blocks.0.unused": "not reached by a generation",
                           "blocks.1.unused": "not reached by a generation"}
    assert Layout.from_json(layout.to_json()) == layout


def test_per_sample_means_one_row_per_sample_whatever_the_batch():
    layout = trace_layout(Toy().to("meta"), (torch.randn(3, 4, 8),), {"temb": torch.randn(3, 8)})
    assert "blocks.0.q" not in layout.weight_only and "blocks.0.mod_a" in layout.weight_only


def test_a_generation_that_never_calls_the_denoiser_is_one_error():
    with pytest.raises(DiscoveryError, match="without calling the Toy"):
        capture_call(Toy(), lambda: None)


def test_a_model_without_repeated_blocks_or_that_needs_values_is_one_error():
    with pytest.raises(DiscoveryError, match="no list of repeated blocks"):
        trace_layout(nn.Sequential(nn.Linear(4, 4)).to("meta"), (torch.randn(1, 2, 4),), {})

    class DataDependent(Toy):
        def forward(self, hidden_states, temb):
            if hidden_states.sum().item() > 0:  # a branch on values: the meta device has none
                return hidden_states
            return super().forward(hidden_states, temb)

    with pytest.raises(DiscoveryError, match="tracing DataDependent on the meta device failed"):
        trace_layout(DataDependent().to("meta"), (torch.randn(1, 2, 8),), {"temb": torch.randn(1, 8)})


def _denoiser_classes() -> list[str]:
    """Every transformer and UNet model class of the installed diffusers."""
    import diffusers
    from diffusers import ModelMixin

    classes = {name: getattr(diffusers, name, None) for name in dir(diffusers)
               if "Transformer" in name or "UNet" in name}
    return sorted(name for name, cls in classes.items() if isinstance(cls, type) and issubclass(cls, ModelMixin))


@pytest.mark.parametrize("name", _denoiser_classes())
def test_every_installed_denoiser_class_has_blocks_of_linears(name):
    """Built from its default config on the meta device (no memory): whatever diffusers ships — DiTs, video
    transformers, UNets — structure alone finds its blocks, each holding linears. Classes whose defaults do not
    make a model (they require an argument) are skipped, naming why."""
    import diffusers

    try:
        with torch.device("meta"):
            model = getattr(diffusers, name)()
    except (TypeError, ValueError) as error:
        pytest.skip(f"{name} needs configuration to be built ({type(error).__name__})")
    paths = block_paths(model)
    assert paths, f"{name}: no blocks found"
    assert all(any(isinstance(m, nn.Linear) for m in model.get_submodule(p).modules()) for p in paths)
    assert len(set(paths)) == len(paths) and not any(a.startswith(f"{b}.") for a in paths for b in paths)
