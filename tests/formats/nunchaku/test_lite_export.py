"""svdq export --format diffusers, opened by diffusers itself: ``DiffusionPipeline.from_pretrained`` builds the
denoiser through ``NunchakuLiteQuantizer`` (only its CUDA check relaxed, the kernels replaced by the CPU
stand-in), and the image it makes is compared with svdq's own reference path on the same prompt and seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svdq_cli.formats.nunchaku.lite import unsupported
from svdq_cli.formats.nunchaku.lite_kernels import install
from svdq_cli.formats.svdq_file import load_quantized_pipeline
from svdq_cli.models.loading import adapter_of, load_pipeline
from tests.conftest import failed_copy, svdq
from tests.models.new_families import saved

install()
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.quantizers.nunchaku.nunchaku_quantizer import NunchakuLiteQuantizer  # noqa: E402
from diffusers.quantizers.nunchaku.utils import (  # noqa: E402
    AWQW4A16Linear,
    SVDQW4A4Linear,
    check_strict_state_dict_match,
)

RECIPE = """
model: "{model}"
family: {family}
dtype: bfloat16
device: cpu
quant: {{method: svdquant, precision: {precision}, rank: 16, calib_rows: 64, search_rows: 32, act_range: {act}}}
calibration: {{num_prompts: 1, steps: 1, resolution: 64}}
validation: {{num_prompts: 1, steps: 1, resolution: 64}}
{extra}
"""
PROMPT, SEED, STEPS, RESOLUTION = "a red fox in fresh snow", 0, 1, 64
# How far below the reference's own bf16-vs-float32 PSNR the Lite image may fall: with Nunchaku's activation rule
# only the kernels' 16-bit arithmetic differs (an epilogue that rounds three times, a 16-bit INT4 accumulator);
# with svdq's, the rule itself does too.
MARGIN_DB = {"nunchaku": 4.0, "svdq": 6.0}


def quantized(tmp: Path, model: str, family: str, precision: str, act: str, pipeline_args: str | None) -> Path:
    extra = f"pipeline_args: {pipeline_args}" if pipeline_args else ""
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE.format(model="" if family == "diffusers" else model, family=family,
                                    precision=precision, act=act, extra=extra))
    run = tmp / "run"
    code, _, stderr = svdq("quantize", model, "--recipe", recipe, "--out", run)
    assert code == 0, stderr
    return run


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / ((a.float() - b.float()) ** 2).mean())).item()


# name → (model, family, precision, activation rule, pipeline_args); tiny-flux int4 svdq is the shared bf16 run
CASES = {
    "tiny-flux-nvfp4": ("tiny-flux", "tiny-flux", "nvfp4", "nunchaku", None),
    "tiny-sd3": ("tiny-sd3", "tiny-sd3", "int4", "nunchaku", None),
    "tiny-sana": ("tiny-sana", "tiny-sana", "int4", "nunchaku", None),
    "qwen-image": ("QwenImagePipeline", "diffusers", "int4", "nunchaku", "{max_sequence_length: 32}"),
    "sdxl": ("StableDiffusionXLPipeline", "diffusers", "int4", "nunchaku", None),  # a UNet: the component is unet
}


@pytest.fixture(params=["tiny-flux-int4", *CASES])
def lite_run(request, tmp_path, bf16_run) -> tuple[Path, str]:
    if request.param == "tiny-flux-int4":
        run = tmp_path / "run"
        shutil.copytree(bf16_run, run)
        return run, "tiny-flux"
    model, family, precision, act, pipeline_args = CASES[request.param]
    if family == "diffusers":
        model = str(saved(model, tmp_path / "models"))
    return quantized(tmp_path, model, family, precision, act, pipeline_args), model


@pytest.mark.slow
def test_diffusers_opens_the_export_and_draws_what_svdq_validated(lite_run):
    run, model = lite_run
    code, stdout, stderr = svdq("export", run, "--format", "diffusers", "--json")
    assert code == 0, stderr
    written = json.loads(stdout)["diffusers"]
    directory = run / "export" / "diffusers"
    component = written["component"]
    quantization = json.loads((directory / component / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "nunchaku_lite"
    w4a4 = quantization["svdq_w4a4"]["targets"]
    w4a16 = quantization.get("awq_w4a16", {}).get("targets", [])
    assert len(w4a4) == written["w4a4_layers"] > 0 and len(w4a16) == written["w4a16_layers"]

    pipeline = DiffusionPipeline.from_pretrained(directory, torch_dtype=torch.bfloat16)
    denoiser = getattr(pipeline, component)
    assert isinstance(denoiser.hf_quantizer, NunchakuLiteQuantizer)
    assert all(isinstance(denoiser.get_submodule(name), SVDQW4A4Linear) for name in w4a4)
    assert all(isinstance(denoiser.get_submodule(name), AWQW4A16Linear) for name in w4a16)
    state = {}
    for shard in sorted((directory / component).glob("*.safetensors")):
        state.update(load_file(shard))
    check_strict_state_dict_match(denoiser, state)  # diffusers' own check: no key missing, none left over
    assert not any(p.is_meta for p in denoiser.parameters())

    metadata_export = json.loads((run / "manifest.json").read_text())["stages"]["export"]["file"]
    reference = load_quantized_pipeline(run / metadata_export)
    recipe = json.loads((run / "manifest.json").read_text())["config"]
    adapter = adapter_of(recipe["family"], recipe["model"], recipe.get("pipeline_args"))
    pipeline.set_progress_bar_config(disable=True)

    def draw(p):
        return adapter.generate(p, [PROMPT], [SEED], STEPS, adapter.protocol.guidance, RESOLUTION)

    lite, ours = draw(pipeline), draw(reference)
    reference.to(torch.float32)  # the same quantized layers, every activation in float32
    floor = psnr(ours, draw(reference))  # what bf16 storage alone moves the validated image
    sixteen_bit = draw(load_pipeline(recipe["model"], adapter, torch.bfloat16))
    measured = psnr(lite, ours)
    quant = recipe["quant"]
    print(f"{Path(model).name} ({quant['precision']}, act {quant['act_range']}): Lite vs svdq reference "
          f"{measured:.1f} dB, reference bf16 vs float32 {floor:.1f} dB; vs 16-bit: Lite {psnr(lite, sixteen_bit):.1f}"
          f" dB, reference {psnr(ours, sixteen_bit):.1f} dB")
    assert measured > floor - MARGIN_DB[quant["act_range"]]
    assert psnr(lite, sixteen_bit) > psnr(ours, sixteen_bit) - 1.0  # as close to the 16-bit model as validated


def test_the_card_and_the_hub_upload_describe_the_directory(bf16_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bf16_run, run)
    assert svdq("export", run, "--format", "diffusers", "--no-pipeline")[0] == 0
    assert not (run / "export" / "diffusers" / "model_index.json").exists()
    code, stdout, stderr = svdq("push-to-hub", run, "me/tiny-lite", "--format", "diffusers", "--dry-run", "--json")
    assert code == 0, stderr
    plan = json.loads(stdout)
    assert "transformer/config.json" in plan["files"] and "transformer/diffusion_pytorch_model.safetensors" in plan[
        "files"]
    card = plan["card"]
    assert "sm_75" in card and "not Hopper" in card and "DIFFUSERS_TRUST_REMOTE_KERNELS=true" in card
    assert 'DiffusionPipeline.from_pretrained("me/tiny-lite"' in card and "--act-range nunchaku" in card
    (run / "export" / "diffusers" / "transformer" / "config.json").write_text("{}")
    code, _, stderr = svdq("push-to-hub", run, "me/tiny-lite", "--format", "diffusers", "--dry-run")
    assert code == 2 and "checksum" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_failed_validation_exports_only_with_force(bf16_run, tmp_path):
    run = failed_copy(bf16_run, tmp_path)
    code, _, stderr = svdq("export", run, "--format", "diffusers")
    assert code == 2 and "--force" in stderr and not (run / "export" / "diffusers").exists()
    assert svdq("export", run, "--format", "diffusers", "--force", "--no-pipeline")[0] == 0


def test_runs_the_format_cannot_hold_are_refused_before_any_work(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)  # a float32 run
    code, _, stderr = svdq("export", run, "--format", "diffusers")
    assert code == 2 and "bfloat16" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (run / "export" / "diffusers").exists()
    base = json.loads((run / "manifest.json").read_text())["config"]
    for change, word in (({"method": "vq4dit", "bits": 2}, "vq4dit"), ({"precision": "int8"}, "int8"),
                         ({"weight_only": True}, "weight-only"), ({"scale_dtype": "float32"}, "float32 scales")):
        config = {**base, "dtype": "bfloat16", "quant": {**base["quant"], **change}}
        reason = unsupported(config)
        assert reason is not None and word in reason and "--format svdq" in reason
