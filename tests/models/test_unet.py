"""UNets (SDXL, SD 1.x/2.x) through the generic adapter: what discovery finds in a UNet, streaming it block by
block with its skip connections, and whole runs that export, load back and generate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from svdq_cli.formats.svdq_file import load_quantized_pipeline, read_metadata
from svdq_cli.models.discovery import block_paths
from svdq_cli.models.loading import adapter_of
from svdq_cli.models.streaming import BlockStreamer, component_checkpoint, component_config, empty_model
from svdq_cli.runtime.layers import SVDQLinear
from tests.conftest import svdq
from tests.models.new_families import saved, tiny_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("unets")


@pytest.fixture(scope="module")
def unet_recipe(tmp_path_factory):
    return tiny_recipe(tmp_path_factory.mktemp("recipe"), pipeline_args="{}")  # a UNet call has no max_sequence_length


@pytest.fixture(scope="module")
def sdxl_runs(tmp_path_factory, models, unet_recipe):
    """The tiny SDXL quantized whole and streamed."""
    root = tmp_path_factory.mktemp("sdxl-runs")
    for mode in ("no-stream", "stream"):
        code, stdout, stderr = svdq("quantize", saved("StableDiffusionXLPipeline", models), "--recipe", unet_recipe,
                                    "--out", root / mode, f"--{mode}", "--json")
        assert code == 0, stderr
        assert ("streaming" in stderr) == (mode == "stream")
    return root


def test_a_unets_blocks_are_its_resnets_and_attention_transformers_mid_block_included(models):
    unet = empty_model(_unet_class(), component_config(saved("StableDiffusionXLPipeline", models), "unet"),
                       torch.float32)
    paths = block_paths(unet)
    assert paths[:2] == ["down_blocks.0.resnets.0", "down_blocks.1.attentions.0"]
    assert {"mid_block.attentions.0", "mid_block.resnets.0", "mid_block.resnets.1"} <= set(paths)
    assert not any("samplers" in path for path in paths)  # convolutions only: resident, not streamed
    assert len(paths) == 1 + 2 + 4 + 2 + 3  # down 1 + 2; up (2 attentions + 2 resnets) + 2 resnets; mid 3


def test_targets_of_a_unet(models):
    code, stdout, stderr = svdq("targets", saved("StableDiffusionXLPipeline", models), "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    layers = {layer["name"]: layer for layer in result["layers"]}
    attention = "down_blocks.1.attentions.0"
    assert layers[f"{attention}.proj_in"]["mode"] == "W4A4"
    assert layers["down_blocks.0.resnets.0.time_emb_proj"]["mode"] == "weight-only"  # one temb vector per sample
    assert layers["add_embedding.linear_1"]["mode"] == "16-bit"  # SDXL's added text-and-time embedding
    block = [layers[f"{attention}.transformer_blocks.{i}.attn1.to_{p}"]["group"] for i in (0, 1) for p in "qkv"]
    assert block[:3] == [block[0]] * 3 and block[3] != block[0]  # q, k, v share the hidden state, per layer
    text = {layers[f"{attention}.transformer_blocks.{i}.attn2.to_{p}"]["group"] for i in (0, 1) for p in "kv"}
    assert len(text) == 1  # every cross-attention key and value reads the same text encoding: one λ
    assert layers[f"{attention}.transformer_blocks.0.ff.net.2"]["reason"] == "reads token activations"  # GEGLU
    whole = result["parameters"]
    assert whole["convolutions"] > 10 and 0 < whole["quantized"] < whole["total"] - whole["convolution_parameters"]


def test_the_streamer_reads_each_unet_block_once_per_pass_once_it_has_seen_their_order(models):
    """A UNet calls resnet, attention, resnet… while its block list is attentions then resnets per level: the
    read-ahead follows the order seen, so after the first pass no read is wasted."""
    directory = saved("StableDiffusionXLPipeline", models)
    unet_class = _unet_class()
    whole = unet_class.from_pretrained(directory, subfolder="unet").eval()
    model = empty_model(unet_class, component_config(directory, "unet"), torch.float32)
    checkpoint = component_checkpoint(directory, "unet")
    streamer = BlockStreamer(model, checkpoint, block_paths(model))
    reads = []
    original = checkpoint.read
    checkpoint.read = lambda names, dtypes=None: reads.append(1) or original(names, dtypes)
    generator = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 16, 16, generator=generator), "timestep": torch.tensor(500),
              "encoder_hidden_states": torch.randn(2, 77, 64, generator=generator),
              "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=generator),
                                    "time_ids": torch.randn(2, 6, generator=generator)}}
    with torch.no_grad():
        expected = whole(**inputs).sample
        for _ in range(2):
            reads.clear()
            got = model(**inputs).sample
            assert torch.equal(got, expected)  # skip connections and all, one block at a time
    assert len(reads) == len(streamer.blocks)


def test_a_streamed_unet_exports_the_same_bytes(sdxl_runs):
    exports = [next((sdxl_runs / mode / "export").glob("*.safetensors")).read_bytes() for mode in ("no-stream",
                                                                                                   "stream")]
    assert exports[0] == exports[1]


def test_a_unet_pipeline_quantizes_exports_loads_and_generates(models, sdxl_runs):
    pipeline_class = "StableDiffusionXLPipeline"
    model = saved(pipeline_class, models)
    export = next((sdxl_runs / "no-stream" / "export").glob("*.safetensors"))
    report = json.loads((sdxl_runs / "no-stream" / "validate" / "report.json").read_text())
    assert report["passed"] and report["methods"]["svdquant"]["psnr"] > 20, report["methods"]
    assert read_metadata(export)["model_config"]["component"] == "unet"
    pipeline = load_quantized_pipeline(export)
    assert type(pipeline).__name__ == pipeline_class
    assert sum(isinstance(m, SVDQLinear) for m in pipeline.unet.modules()) > 20
    adapter = adapter_of("diffusers", str(model))
    assert (adapter.denoiser, adapter.protocol.resolution) == ("unet", 64)  # sample_size 32 × the VAE's 2
    image = adapter.generate(pipeline, ["a red fox in fresh snow"], [0], 2, adapter.protocol.guidance, 64)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_stable_diffusion_1_and_2_come_free(models):
    """SD 1.x/2.x: one text encoder, no added conditioning; the same UNet blocks (SDXL runs end to end above)."""
    code, stdout, stderr = svdq("targets", saved("StableDiffusionPipeline", models), "--json")
    assert code == 0, stderr
    lists = json.loads(stdout)["block_lists"]
    assert lists["down_blocks.1.attentions"]["quantized"] > 10 and lists["mid_block.attentions"]["quantized"] > 10
    assert lists["down_blocks.0.resnets"]["weight_only"] == 1


def test_a_single_file_unet_fine_tune_takes_its_base(models, tmp_path):
    """An SDXL fine-tune saved as one file in diffusers' key names replaces the base's UNet."""
    from diffusers import UNet2DConditionModel

    base = saved("StableDiffusionXLPipeline", models)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    file = tmp_path / "my-sdxl-finetune.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in unet.state_dict().items()}, str(file))
    code, stdout, stderr = svdq("targets", file, "--base", base, "--json")
    assert code == 0, stderr
    assert "down_blocks.1.attentions" in json.loads(stdout)["block_lists"]


def _unet_class():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel
