"""Your own checkpoint: a single-file fine-tune quantized with --base giving every other part."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from svdq_cli.formats.svdq_file import load_quantized_pipeline
from svdq_cli.models.registry import ADAPTERS
from tests.conftest import svdq


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "flux"
    ADAPTERS["tiny-flux"].build_tiny(0, torch.float32).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDQ_CACHE_DIR", str(tmp_path / "cache"))


def fine_tune(base, path, change):
    """The base's transformer weights as one file, changed by ``change(tensors)``."""
    tensors = load_file(next((base / "transformer").glob("*.safetensors")))
    change(tensors)
    save_file(tensors, path)
    return path


def test_a_fine_tune_is_quantized_with_its_own_weights(base, tmp_path, recipe_file):
    def brighten(tensors):
        tensors["proj_out.weight"] = tensors["proj_out.weight"] * 3 + 0.25  # a 16-bit layer: kept exactly

    file = fine_tune(base, tmp_path / "my-flux-finetune.safetensors", brighten)
    code, stdout, stderr = svdq("quantize", file, "--base", base, "--recipe", recipe_file, "--out", tmp_path / "run",
                                "--json")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["recipe"] == "tiny-flux:my-flux-finetune"
    transformer = load_quantized_pipeline(json.loads(stdout)["export"]).transformer
    expected = load_file(file)["proj_out.weight"]
    assert torch.equal(transformer.proj_out.weight.detach(), expected)
    assert not torch.equal(expected, load_file(next((base / "transformer").glob("*.safetensors")))["proj_out.weight"])


def test_a_single_file_without_a_base_is_one_line(base, tmp_path):
    file = fine_tune(base, tmp_path / "ft.safetensors", lambda tensors: None)
    code, stdout, stderr = svdq("quantize", file, "--out", tmp_path / "run")
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines()[-1] == (f"Error: {file} is a single file: pass --base, the model it fine-tunes "
                                               "(a recipe such as flux-dev, a diffusers directory or a Hub id)")


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update({"x_embedder.weight": torch.zeros(128, 8)}),
     "ft.safetensors does not fit the base model: x_embedder.weight is [128, 8], the base's config makes it "
     "[128, 16]"),
    (lambda t: t.update({"renamed.weight": t.pop("x_embedder.weight")}),
     "ft.safetensors does not fit the base model's FluxTransformer2DModel: 1 of its tensors are not in the file "
     "(first: x_embedder.weight), and diffusers could not convert it"),
])
def test_a_file_that_does_not_fit_the_base_names_the_first_mismatched_tensor(base, tmp_path, change, message):
    file = fine_tune(base, tmp_path / "ft.safetensors", change)
    code, stdout, stderr = svdq("targets", file, "--base", base)
    assert code == 2 and stdout == ""
    assert message in stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "cache" / "single-file").glob("ft-*"))  # nothing half-assembled is left
