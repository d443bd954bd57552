"""Recorded block calls (block_inputs.py) replay to the block's own outputs, bit for bit, in every family; the
sample is the smallest keys, whichever process saw which prompt."""

from __future__ import annotations

import pytest
import torch

from svdq_cli.calibration.block_inputs import (
    BlockInputSampler,
    block_artifact,
    call_key,
    calls_from_artifact,
    flatten,
    smallest_calls,
    unflatten,
)
from svdq_cli.engines.vector import detached
from svdq_cli.errors import BadInputError
from svdq_cli.models.discovery import block_paths
from svdq_cli.models.registry import ADAPTERS
from svdq_cli.quant.vq import output_tensors


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-pixart", "tiny-sana", "tiny-sd3", "tiny-dit"])
def test_recorded_calls_replay_to_the_blocks_outputs(tmp_path, family):
    adapter = ADAPTERS[family]
    pipeline = adapter.build_tiny(0)
    transformer = pipeline.transformer
    blocks = [transformer.get_submodule(name) for name in block_paths(transformer)]
    outputs: list[list] = [[] for _ in blocks]
    hooks = [block.register_forward_hook(lambda _m, _a, out, i=i: outputs[i].append(detached(out)))
             for i, block in enumerate(blocks)]
    sampler = BlockInputSampler(blocks, keep=2, seed=5, spill=tmp_path / "spill")
    with sampler.recording(), torch.no_grad():
        sampler.start_unit(3)
        adapter.generate(pipeline, ["a red fox in the snow"], [0], 2, adapter.protocol.guidance, 64,
                         output_type="latent")
    for hook in hooks:
        hook.remove()
    for index, block in enumerate(blocks):
        keys = [call_key(5, index, 3, call) for call in range(len(outputs[index]))]
        chosen = sorted(range(len(keys)), key=keys.__getitem__)[:2]
        tensors, metadata = block_artifact(sampler.kept_calls()[index])
        calls = calls_from_artifact(tensors, metadata)
        assert len(calls) == 2
        with torch.no_grad():
            for (args, kwargs), call in zip(calls, chosen, strict=True):
                replayed, original = output_tensors(block(*args, **kwargs)), output_tensors(outputs[index][call])
                assert len(replayed) == len(original) > 0
                assert all(torch.equal(a, b) for a, b in zip(replayed, original, strict=True)), (family, index)
    sampler.discard()
    assert not (tmp_path / "spill").exists()


def test_the_sample_is_the_smallest_keys_whichever_rank_kept_them():
    shares = [[(5, "a"), (9, "b")], [(1, "c"), (7, "d")], []]
    assert smallest_calls(shares, 3) == [(1, "c"), (5, "a"), (7, "d")]


def test_flatten_round_trips_nested_arguments_and_refuses_objects():
    tensors: dict[str, torch.Tensor] = {}
    value = (torch.ones(2), {"mask": None, "scale": 1.5, "pair": [torch.zeros(1), "x"]}, True)
    spec = flatten(value, "t", tensors)
    back = unflatten(spec, tensors)
    assert torch.equal(back[0], value[0]) and back[1]["mask"] is None and back[1]["scale"] == 1.5
    assert torch.equal(back[1]["pair"][0], value[1]["pair"][0]) and back[1]["pair"][1] == "x" and back[2] is True
    with pytest.raises(BadInputError, match="object"):
        flatten(object(), "t", {})
