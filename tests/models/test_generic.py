"""The generic adapter: a diffusers pipeline svdq has no preset for, driven from what its directory and its call
say, through every stage to an export that loads back as the same pipeline class and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from svdq_cli.errors import BadInputError
from svdq_cli.formats.svdq_file import load_quantized_pipeline
from svdq_cli.models.loading import adapter_of
from svdq_cli.run.recipe import load_recipe
from svdq_cli.runtime.layers import SVDQLinear
from tests.conftest import svdq
from tests.models.new_families import BUILDERS, saved, tiny_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("new-families")


@pytest.fixture(scope="module")
def generic_recipe(tmp_path_factory):
    return tiny_recipe(tmp_path_factory.mktemp("recipe"))


def test_the_protocol_is_read_from_the_pipeline_call_and_configs(models):
    chroma = adapter_of("diffusers", str(saved("ChromaPipeline", models)))
    assert (chroma.pipeline_class, chroma.denoiser_class) == ("ChromaPipeline", "ChromaTransformer2DModel")
    assert (chroma.protocol.steps, chroma.protocol.guidance) == (35, 5.0)  # ChromaPipeline.__call__'s defaults
    assert chroma.passes_per_step(chroma.protocol.guidance) == 2  # true classifier-free guidance
    kontext = adapter_of("diffusers", str(saved("FluxKontextPipeline", models)), {"max_sequence_length": 32})
    assert (kontext.protocol.steps, kontext.protocol.guidance) == (28, 3.5)
    assert kontext.protocol.extra == {"max_sequence_length": 32}


def test_a_directory_without_a_preset_takes_the_generic_recipe(models):
    code, stdout, stderr = svdq("targets", saved("ChromaPipeline", models), "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["family"] == "diffusers"
    assert set(result["block_lists"]) == {"transformer_blocks", "single_transformer_blocks",
                                          "distilled_guidance_layer.layers", "(outside)"}
    layers = {layer["name"]: layer for layer in result["layers"]}
    # Chroma's guidance approximator (a list inside a submodule) computes every modulation before the blocks
    # run: its layers are streamed like blocks, and stay 16-bit
    approximator = layers["distilled_guidance_layer.layers.0.linear_1"]
    assert (approximator["mode"], approximator["reason"]) == ("16-bit", "conditions the repeated blocks (runs "
                                                                          "before them)")
    assert result["block_lists"]["distilled_guidance_layer.layers"]["quantized"] == 0
    modes = {name: layer["mode"] for name, layer in layers.items()}
    assert modes["transformer_blocks.0.attn.to_q"] == "W4A4"


@pytest.mark.parametrize("pipeline_class", sorted(BUILDERS))
def test_a_new_family_quantizes_exports_loads_and_generates(models, generic_recipe, tmp_path, pipeline_class):
    model = saved(pipeline_class, models)
    code, stdout, stderr = svdq("quantize", model, "--recipe", generic_recipe, "--out", tmp_path / "run", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["validate"]["passed"] and summary["validate"]["psnr"] > 20, summary["validate"]
    pipeline = load_quantized_pipeline(summary["export"])
    assert type(pipeline).__name__ == pipeline_class  # a Kontext export used to load back as a FluxPipeline
    assert sum(isinstance(m, SVDQLinear) for m in pipeline.transformer.modules()) > 10
    adapter = adapter_of("diffusers", str(model), {"max_sequence_length": 32})
    image = adapter.generate(pipeline, ["a red fox in fresh snow"], [0], 2, adapter.protocol.guidance, 64)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_the_generic_adapter_quantizes_a_preset_familys_model_to_the_same_bits_as_its_preset(tmp_path):
    """What the preset writes down (tiny-flux's), the generic adapter reads from the saved model and its call:
    the same linears, groups and modulation found, the same calibration, the same quantized weights."""
    from safetensors.torch import load_file

    from svdq_cli.models import flux
    from tests.models.new_families import TINY_RECIPE

    model = tmp_path / "flux"
    flux.build_tiny(0).save_pretrained(model)
    runs = {}
    for family in ("tiny-flux", "diffusers"):
        recipe = tmp_path / f"{family}.yaml"
        recipe.write_text(TINY_RECIPE.format(pipeline_args="{max_sequence_length: 32}").replace(
            "family: diffusers", f"family: {family}"))
        code, _, stderr = svdq("quantize", model, "--recipe", recipe, "--out", tmp_path / family, "--json")
        assert code == 0, stderr
        runs[family] = {path.name: load_file(path) for path in (tmp_path / family / "quantize").glob("*.safetensors")}
    preset, generic = runs["tiny-flux"], runs["diffusers"]
    assert preset and preset.keys() == generic.keys()
    for name, tensors in preset.items():
        assert tensors.keys() == generic[name].keys(), name
        assert all(tensors[key].equal(generic[name][key]) for key in tensors), name


def test_a_video_pipeline_validates_every_frame_and_loads_back(models, generic_recipe, tmp_path):
    """Wan 2.x text to video: a video is its frames side by side, so validation compares every frame and its
    comparison sheet is a frame strip per prompt. Frames are rectangles, as Wan's protocol (832x480) has them."""
    from PIL import Image

    model = saved("WanPipeline", models)
    recipe = tiny_recipe(tmp_path, "{max_sequence_length: 32, num_frames: 5}")
    code, stdout, stderr = svdq("quantize", model, "--recipe", recipe, "--out", tmp_path / "run", "--json",
                                "--resolution", "96x64", "--val-resolution", "96x64")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["validate"]["passed"] and summary["validate"]["psnr"] > 20, summary["validate"]
    assert summary["stages"]["collect"]["resolution"] == "96x64"
    sheet = Image.open(tmp_path / "run" / "validate" / "comparison.png")
    assert sheet.width == 3 * 5 * 96  # 16-bit, quantized and difference columns, five frames each
    pipeline = load_quantized_pipeline(summary["export"])
    assert type(pipeline).__name__ == "WanPipeline"
    assert sum(isinstance(m, SVDQLinear) for m in pipeline.transformer.modules()) > 10
    adapter = adapter_of("diffusers", str(model), {"max_sequence_length": 32, "num_frames": 5})
    video = adapter.generate(pipeline, ["a red fox in fresh snow"], [0], 2, adapter.protocol.guidance, "96x64")
    assert video.shape == (1, 3, 64, 5 * 96) and torch.isfinite(video).all()


def test_a_videos_token_count_covers_every_latent_frame(models):
    """The memory bound and the CPU cost notice count the tokens of every latent frame: the tiny Wan's VAE
    halves time, so 81 frames are 41 latent frames of (64 px / 2 / 2)² tokens each."""
    from svdq_cli.models.loading import load_pipeline

    model = str(saved("WanPipeline", models))
    pipeline = load_pipeline(model, adapter_of("diffusers", model), torch.float32)
    assert adapter_of("diffusers", model).tokens(pipeline, 64) == 16**2 * 41  # the call's default: 81 frames
    assert adapter_of("diffusers", model, {"num_frames": 5}).tokens(pipeline, 64) == 16**2 * 3


def _edit_prompts(directory, count: int) -> Path:
    """A prompt file of ``count`` editing prompts, each with its own 48×80 random reference image."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(count)
    items = []
    for index in range(count):
        Image.fromarray(generator.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(directory / f"ref{index}.png")
        items.append({"prompt": "make it night", "image": f"ref{index}.png"})
    path = directory / f"edits-{count}.json"
    path.write_text(json.dumps(items))
    return path


def test_kontext_edits_its_reference_image_in_calibration_and_validation(models, tmp_path):
    """FLUX.1 Kontext with prompts that carry reference images: the image reaches the transformer (its latent
    tokens join the generated ones), and the run quantizes, validates and exports."""
    from svdq_cli.calibration.prompts import load_prompts
    from svdq_cli.models.loading import load_pipeline

    model = str(saved("FluxKontextPipeline", models))
    calibration, validation = _edit_prompts(tmp_path, 2), _edit_prompts(tmp_path, 1)
    adapter = adapter_of("diffusers", model, {"max_sequence_length": 32})
    pipeline = load_pipeline(model, adapter, torch.float32)
    tokens = []
    pipeline.transformer.register_forward_pre_hook(lambda _m, _a, kwargs: tokens.append(
        kwargs["hidden_states"].shape[1]), with_kwargs=True)
    edit = load_prompts(str(validation))
    for prompts in (["make it night"], edit):
        adapter.generate(pipeline, prompts, [0], 1, adapter.protocol.guidance, 64, "latent")
    assert tokens == [16**2, 2 * 16**2]  # 64 px: 16×16 packed tokens, and as many of the reference image
    code, stdout, stderr = svdq("quantize", model, "--recipe", tiny_recipe(tmp_path), "--out", tmp_path / "run",
                                "--json", "--prompts", calibration, "--val-prompts-from", validation)
    assert code == 0, stderr
    assert json.loads(stdout)["validate"]["passed"]
    config = json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]
    assert (config["calibration"]["prompts"], config["validation"]["prompts"]) == (str(calibration), str(validation))
    code, _, stderr = svdq("quantize", "tiny-flux", "--prompts", calibration, "--out", tmp_path / "flux")
    assert code == 2 and "FluxPipeline, which takes no reference image" in stderr.strip().splitlines()[-1]


def test_a_strip_holds_the_frames_in_order_and_ssim_is_taken_frame_by_frame():
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    from svdq_cli.models.base import frame_strip, strip_frames
    from svdq_cli.stages.validate import _metrics

    generator = torch.Generator().manual_seed(7)
    frames = torch.rand(1, 4, 3, 32, 32, generator=generator)
    noisy = (frames + 0.05 * torch.randn(frames.shape, generator=generator)).clamp(0, 1)
    strip = frame_strip(frames)
    assert torch.equal(strip[0, ..., 64:96], frames[0, 2]) and torch.equal(strip_frames(strip, 32), frames[0])
    latents = torch.randn(1, 8, generator=generator)
    got = _metrics(frame_strip(noisy), latents, strip, latents, 32)
    expected = sum(ssim(noisy[:, f], frames[:, f], data_range=1.0).item() for f in range(4)) / 4
    assert got["ssim"] == pytest.approx(expected, rel=1e-5)
    assert got["ssim"] != pytest.approx(ssim(frame_strip(noisy), strip, data_range=1.0).item(), rel=1e-5)


def test_an_encoding_of_per_prompt_lists_round_trips_through_the_cache_form():
    """Z-Image's encode_prompt returns lists of tensors of each prompt's own length."""
    from svdq_cli.models.text_first import from_tensors, to_tensors

    outputs = (torch.randn(1, 5, 8), None, [torch.randn(3, 8), torch.randn(7, 8)], [])
    negative = (torch.randn(1, 2, 8), torch.randn(1, 2))  # a second encode_prompt call (a negative prompt)
    tensors, metadata = to_tensors((outputs, negative))
    back, back_negative = from_tensors(tensors, metadata)
    assert back[1] is None and back[3] == [] and torch.equal(back[0], outputs[0])
    assert [t.shape for t in back[2]] == [(3, 8), (7, 8)] and all(map(torch.equal, back[2], outputs[2]))
    assert len(back_negative) == 2 and all(map(torch.equal, back_negative, negative))


def test_a_negative_prompt_is_recorded_and_replayed_with_the_prompt(models):
    """FLUX.2 klein's classifier-free guidance encodes an empty negative prompt in a second encode_prompt
    call: both are recorded, and a generation replaying them gives the latents of one that encodes."""
    from svdq_cli.models.loading import load_pipeline
    from svdq_cli.models.text_first import encode, replaying

    model = str(saved("Flux2KleinPipeline", models))
    adapter = adapter_of("diffusers", model, {"max_sequence_length": 32})
    pipeline = load_pipeline(model, adapter, torch.float32)

    def generate(pipe):
        return adapter.generate(pipe, ["a red fox in fresh snow"], [3], 2, adapter.protocol.guidance, 64, "latent")

    encoding = encode(pipeline, pipeline.transformer, generate)
    assert len(encoding) == 2 and encoding[0][0].shape == encoding[1][0].shape
    assert not torch.equal(encoding[0][0], encoding[1][0])  # the prompt and the empty negative prompt
    expected = generate(pipeline)
    pipeline.text_encoder = None  # a replayed generation must not need the text encoder
    with replaying(pipeline, encoding):
        assert torch.equal(generate(pipeline), expected)
    with replaying(pipeline, encoding[:1]), pytest.raises(RuntimeError, match="encoded a prompt 2 times"):
        generate(pipeline)


@pytest.mark.parametrize("recipe,pipeline_class,block_list", [
    ("qwen-image", "QwenImagePipeline", "transformer_blocks"),  # true CFG: the negative prompt is a second call
    ("flux2-dev", "Flux2Pipeline", "single_transformer_blocks"),  # guidance embedded, Mistral 3's stacked layers
    ("sdxl-turbo", "StableDiffusionXLPipeline", "down_blocks.1.attentions"),  # its skip patterns match
    ("flux.1-kontext-dev", "FluxKontextPipeline", "transformer_blocks"),  # edits: prompts with images
])
def test_a_shipped_recipe_drives_its_pipeline_class(models, tmp_path, recipe, pipeline_class, block_list):
    """The published recipes of families without a preset, applied to a tiny model of their class: their
    pipeline_args are arguments the call takes and their target overrides match its layers."""
    prompts = ["--prompts", _edit_prompts(tmp_path, 1)] if recipe == "flux.1-kontext-dev" else []
    code, stdout, stderr = svdq("targets", saved(pipeline_class, models), "--recipe", recipe, "--device", "cpu",
                                "--json", *prompts)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["block_lists"][block_list]["quantized"] > 0
    if recipe == "sdxl-turbo":
        layers = {layer["name"]: layer for layer in result["layers"]}
        assert layers["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]["mode"] == "16-bit"


def test_pipeline_args_cannot_set_what_svdq_sets(tmp_path):
    recipe = tiny_recipe(tmp_path, "{height: 512}")
    with pytest.raises(BadInputError, match=r"pipeline_args.height: svdq sets it from the recipe \(resolution\)"):
        load_recipe(str(recipe))


@pytest.mark.parametrize("index,message", [
    ({"_class_name": "StableDiffusionXLPipeline", "vae": ["diffusers", "AutoencoderKL"]},
     "StableDiffusionXLPipeline has no transformer or unet component"),
    ({"_class_name": "ChronoEditPipeline", "transformer": ["diffusers", "ChronoEditTransformer3DModel"]},
     "ChronoEditPipeline's call requires image, which svdq's calibration prompts do not carry"),
    ({"_class_name": "NoSuchPipeline", "transformer": ["diffusers", "X"]},
     "pipeline NoSuchPipeline is not a class of the installed diffusers"),
])
def test_a_call_the_generic_adapter_cannot_drive_is_one_line(tmp_path, index, message):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(index))
    code, stdout, stderr = svdq("quantize", tmp_path / "model", "--out", tmp_path / "run")
    assert code == 2 and stdout == ""
    assert message in stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_a_call_failing_for_a_missing_library_or_image_says_what_to_give(models):
    """diffusers calls some optional libraries it imports only when installed (Wan's prompt cleaning: ftfy);
    an image-taking call (img2img, editing) given text prompts alone fails inside diffusers: both are one line
    naming what to provide."""
    def needs_ftfy(**arguments):
        raise NameError("name 'ftfy' is not defined", name="ftfy")

    def needs_image(**arguments):
        raise ValueError("Input is in incorrect format")

    chroma = adapter_of("diffusers", str(saved("ChromaPipeline", models)))
    with pytest.raises(BadInputError, match="needs a library that is not installed .*: pip install ftfy$"):
        chroma.generate(needs_ftfy, ["a cat"], [0], 1, 1.0, 64)
    with pytest.raises(BadInputError, match="give the arguments it needs as the recipe's pipeline_args"):
        chroma.generate(needs_image, ["a cat"], [0], 1, 1.0, 64)  # Chroma's call takes no image
    kontext = adapter_of("diffusers", str(saved("FluxKontextPipeline", models)))
    with pytest.raises(BadInputError, match="it takes an image: give it prompts with images"):
        kontext.generate(needs_image, ["a cat"], [0], 1, 1.0, 64)


def test_a_component_that_needs_a_library_not_installed_names_it(models, tmp_path):
    """Qwen-Image-Edit's Qwen2VLProcessor cannot be built without torchvision (transformers 5 checks its video
    processor): loading such a pipeline says what to install, in one line."""
    import importlib.util
    import shutil

    from transformers import Qwen2VLImageProcessorPil

    from svdq_cli.models import tiny

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the processor loads")
    model = tmp_path / "edit"
    shutil.copytree(saved("QwenImagePipeline", models), model)
    tiny.tokenizer(1024).save_pretrained(model / "processor")
    Qwen2VLImageProcessorPil().save_pretrained(model / "processor")
    index = json.loads((model / "model_index.json").read_text())
    index.update({"_class_name": "QwenImageEditPipeline", "processor": ["transformers", "Qwen2VLProcessor"]})
    (model / "model_index.json").write_text(json.dumps(index))
    code, stdout, stderr = svdq("targets", model)
    assert code == 2 and stdout == ""
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: cannot load {model} as a QwenImageEditPipeline (ImportError: ")
    assert line.endswith("; pip install torchvision")
    from svdq_cli.models.loading import install_hint

    assert install_hint(ModuleNotFoundError("No module named 'ftfy'", name="ftfy")) == "; pip install ftfy"
    assert install_hint(ValueError("a config key is missing")) == ""
