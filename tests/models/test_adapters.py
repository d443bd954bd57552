import inspect

import diffusers
import pytest

from svdq_cli.models.base import AdapterMismatchError
from svdq_cli.models.registry import ADAPTERS


def test_a_missing_block_list_names_the_diffusers_version():
    pixart = ADAPTERS["tiny-pixart"].build_tiny(0).transformer
    del pixart.transformer_blocks
    expected = rf"no block list 'transformer_blocks'.*diffusers {diffusers.__version__}"
    with pytest.raises(AdapterMismatchError, match=expected):
        ADAPTERS["tiny-pixart"].block_groups(pixart)


def test_a_missing_linear_names_the_layer_and_the_diffusers_version():
    pixart = ADAPTERS["tiny-pixart"].build_tiny(0).transformer
    del pixart.transformer_blocks[0].attn1.to_q  # as if a diffusers release had renamed it
    with pytest.raises(AdapterMismatchError,
                       match=rf"'transformer_blocks.0.attn1.to_q' not found \(diffusers {diffusers.__version__}\)"):
        ADAPTERS["tiny-pixart"].block_groups(pixart)


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-pixart", "tiny-sana", "tiny-sd3"])
def test_tiny_models_have_planted_outliers_in_quantized_inputs(family):
    adapter = ADAPTERS[family]
    pipeline = adapter.build_tiny(0)
    _, groups = adapter.block_groups(pipeline.transformer)[0]
    seen = {}
    pipeline.transformer.get_submodule(groups[0][0]).register_forward_pre_hook(
        lambda _module, args: seen.setdefault("x", args[0].detach()))
    adapter.generate(pipeline, ["a red fox in snow"], [0], 1, adapter.protocol.guidance, 64, output_type="latent")
    channel_max = seen["x"].reshape(-1, seen["x"].shape[-1]).abs().amax(0)
    assert channel_max.max() / channel_max.median() > 10


@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_every_family_generates_at_the_resolution_asked(family):
    """A pipeline that can bin resolutions (PixArt, Sana: generate at the nearest trained size, then resize)
    has binning off, so that the manifest's --resolution is the size the model ran at."""
    adapter = ADAPTERS[family]
    parameters = inspect.signature(getattr(diffusers, adapter.pipeline_class).__call__).parameters
    if "use_resolution_binning" in parameters:
        assert adapter.protocol.extra.get("use_resolution_binning") is False
