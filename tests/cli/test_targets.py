"""``svdq targets``: what would be quantized and why, before any calibration; its overrides drive quantize."""

from __future__ import annotations

import json

import pytest

from svdq_cli.formats.svdq_file import load_quantized_pipeline
from svdq_cli.runtime.layers import SVDQLinear
from tests.conftest import svdq


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-sana", "tiny-dit"])
def test_targets_lists_every_linear_with_a_mode_and_a_reason(family):
    code, stdout, stderr = svdq("targets", family, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    lists = {name: entry for name, entry in result["block_lists"].items() if name != "(outside)"}
    assert lists and all(entry["blocks"] > 0 and entry["quantized"] + entry["weight_only"] > 0
                         for entry in lists.values())
    modes = {layer["mode"] for layer in result["layers"]}
    allowed = {"weight-only", "16-bit"} if result["method"] == "vq4dit" else {"W4A4", "weight-only", "16-bit"}
    assert "16-bit" in modes and modes - {"16-bit"} and modes <= allowed  # embedders and output stay 16-bit
    assert all(layer["reason"] for layer in result["layers"])
    assert all((layer["group"] is None) == (layer["mode"] == "16-bit") for layer in result["layers"])


def test_targets_shows_the_overrides_and_refuses_a_pattern_that_matches_nothing():
    code, stdout, _ = svdq("targets", "tiny-flux", "--json", "--skip", "single_transformer_blocks.*.proj_out",
                           "--weight-only-layers", "transformer_blocks.*.ff.net.2")
    layers = {layer["name"]: layer for layer in json.loads(stdout)["layers"]}
    assert code == 0
    assert layers["single_transformer_blocks.3.proj_out"]["reason"] == "skipped by targets.skip"
    assert layers["transformer_blocks.1.ff.net.2"]["mode"] == "weight-only"
    code, stdout, stderr = svdq("targets", "tiny-flux", "--skip", "transformer_blocks.*.to_qkv")
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines()[-1] == ("Error: targets.skip pattern 'transformer_blocks.*.to_qkv' matches no "
                                               "linear layer of the model (`svdq targets MODEL` lists them)")


def test_targets_prints_tables_on_a_terminal_or_pipe():
    code, stdout, _ = svdq("targets", "tiny-sd3")
    assert code == 0
    assert "transformer_blocks.0.norm1.linear" in stdout and "reads one vector per sample (modulation)" in stdout


def test_a_skipped_layer_stays_16_bit_in_the_export(recipe_file, tmp_path):
    code, stdout, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", tmp_path / "run", "--json",
                                "--skip", "single_transformer_blocks.*")
    assert code == 0, stderr
    transformer = load_quantized_pipeline(json.loads(stdout)["export"]).transformer
    quantized = {name for name, module in transformer.named_modules() if isinstance(module, SVDQLinear)}
    assert quantized and not any(name.startswith("single_transformer_blocks.") for name in quantized)
    assert all(name.startswith("transformer_blocks.") for name in quantized)


def test_an_export_records_its_local_base_model_absolutely_and_base_overrides_it(recipe_file, tmp_path, monkeypatch):
    """Quantized from a relative path, the export loads from any directory; once the model has moved it is one
    line naming it, and ``base=`` points at the new place."""
    import torch

    from svdq_cli.errors import BadInputError
    from svdq_cli.models.registry import ADAPTERS

    monkeypatch.chdir(tmp_path)
    ADAPTERS["tiny-flux"].build_tiny(0, torch.float32).save_pretrained("models/flux")
    code, stdout, stderr = svdq("quantize", "models/flux", "--recipe", recipe_file, "--out", "run", "--json")
    assert code == 0, stderr
    export = tmp_path / json.loads(stdout)["export"]
    monkeypatch.chdir("/")
    assert load_quantized_pipeline(export).transformer is not None
    (tmp_path / "models" / "flux").rename(tmp_path / "moved")
    with pytest.raises(BadInputError, match=rf"quantized from {tmp_path}/models/flux, which is not here; pass base="):
        load_quantized_pipeline(export)
    pipeline = load_quantized_pipeline(export, base=tmp_path / "moved")
    assert sum(isinstance(m, SVDQLinear) for m in pipeline.transformer.modules()) > 0


def _directory(path, pipeline: str, sample_size: int):
    """Just the configs of a diffusers directory: its index, a transformer of ``sample_size`` latent pixels, and
    a VAE downsampling 8×."""
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "transformer": ["diffusers", "X"],
                                                       "vae": ["diffusers", "AutoencoderKL"]}))
    for component, config in (("transformer", {"sample_size": sample_size}), ("vae", {"block_out_channels": [1] * 4})):
        (path / component).mkdir()
        (path / component / "config.json").write_text(json.dumps(config))
    return path


def test_a_directory_starts_from_the_recipe_made_for_its_resolution_or_the_generic_one(tmp_path, monkeypatch):
    from svdq_cli.cli.quantize import _directory_recipe
    from svdq_cli.models import loading

    assert _directory_recipe(_directory(tmp_path / "dit256", "DiTPipeline", 32)) == "dit-xl-2-256"
    assert _directory_recipe(_directory(tmp_path / "dit512", "DiTPipeline", 64)) == "dit-xl-2-512"
    assert _directory_recipe(_directory(tmp_path / "kontext", "FluxKontextPipeline", 64)) == "diffusers"
    # A preset family that no recipe names (a future PIPELINE_FAMILIES entry) falls back to the generic recipe.
    monkeypatch.setitem(loading.PIPELINE_FAMILIES, "DiTPipeline", "dit-without-recipe")
    assert _directory_recipe(tmp_path / "dit256") == "diffusers"
