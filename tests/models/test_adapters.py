import inspect

import diffusers
import pytest

from svdq_cli.models.registry import ADAPTERS


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-pixart", "tiny-sana", "tiny-sd3"])
def test_tiny_models_have_planted_outliers_in_quantized_inputs(family):
    adapter = ADAPTERS[family]
    pipeline = adapter.build_tiny(0)
    layout = adapter.discover(pipeline)
    first = next(group[0] for group in layout.blocks[0][1] if group[0] not in layout.weight_only)
    seen = {}
    pipeline.transformer.get_submodule(first).register_forward_pre_hook(
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


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-pixart", "tiny-sana", "tiny-sd3"])
def test_every_text_to_image_family_generates_the_rectangle_asked(family):
    """``--resolution 96x64`` is 96 px wide and 64 high, not a square of either side."""
    adapter = ADAPTERS[family]
    pipeline = adapter.build_tiny(0)
    pipeline.set_progress_bar_config(disable=True)
    image = adapter.generate(pipeline, ["a red fox in fresh snow"], [0], 1, adapter.protocol.guidance, "96x64")
    assert image.shape == (1, 3, 64, 96)
    assert adapter.tokens(pipeline, "96x64") * 3 == adapter.tokens(pipeline, 96) * 2
    assert adapter.resolution_error(pipeline, "99x64", "--resolution").startswith(
        "--resolution 99x64 is not a multiple of")


def test_dit_refuses_a_rectangle():
    adapter = ADAPTERS["tiny-dit"]
    error = adapter.resolution_error(adapter.build_tiny(0), "96x64", "--resolution")
    assert error == "--resolution 96x64: tiny-dit generates at its own 64 px only"
