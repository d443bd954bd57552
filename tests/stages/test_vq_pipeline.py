"""`svdq quantize MODEL --method vq4dit` end to end on the built-in tiny DiT: stages that do not apply, block-wise
calibration per block, validation with both baselines, a resumable quantize (kill -9) and an export that loads."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from svdq_cli.formats.svdq_file import load_quantized, read_metadata
from svdq_cli.run.directory import FAULT_VARIABLE
from svdq_cli.runtime.vq_linear import VQLinear
from svdq_cli.stages.quantize import load_block_layers
from tests.conftest import svdq
from tests.stages.test_runner import _cli, export_file

RECIPE = """
model: tiny-dit
family: tiny-dit
dtype: float32
device: cpu
quant: {method: vq4dit, bits: 2, vq_steps: 16, vq_calls: 4, kmeans_iters: 8}
calibration: {num_prompts: 2, steps: 2, resolution: 64}
validation: {num_prompts: 1, steps: 2, resolution: 64, baselines: [rtn, kmeans]}
"""


@pytest.fixture(scope="module")
def vq_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("vq-recipe") / "tiny-dit-vq.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, vq_recipe):
    run = tmp_path_factory.mktemp("vq-runs") / "finished"
    code, _, stderr = svdq("quantize", "tiny-dit", "--recipe", vq_recipe, "--out", run)
    assert code == 0, stderr
    return run


def test_vq_run_records_the_stages_that_do_not_apply_and_exports_vq_layers(vq_run):
    code, stdout, _ = svdq("status", vq_run, "--json")
    statuses = {row["stage"]: row["status"] for row in json.loads(stdout)["stages"]}
    assert statuses == {"collect": "done", "smooth": "not applicable", "svd": "not applicable",
                        "quantize": "done", "validate": "done", "export": "done"}
    path = export_file(vq_run)
    assert path.name == "svdq-vq2_d4-tiny-dit.safetensors"
    transformer = load_quantized(path)
    layers = {name: module for name, module in transformer.named_modules() if isinstance(module, VQLinear)}
    assert len(layers) == 3 * 9  # every linear of the three blocks
    stored, _ = load_block_layers_of(vq_run, 0)
    for name, layer in stored.items():
        for key, tensor in layer.state_dict().items():
            assert torch.equal(layers[name].state_dict()[key], tensor)
    code, stdout, _ = svdq("inspect", path, "--json")
    facts = json.loads(stdout)
    assert code == 0 and facts["method"] == "vq4dit" and facts["bits"] == 2
    assert read_metadata(path)["validate"]["ran"]


def load_block_layers_of(run, index):
    from svdq_cli.run.directory import Run

    layers = load_block_layers(Run.existing(run), index)
    return {name: layer for name, (layer, _) in layers.items()}, {name: r for name, (_, r) in layers.items()}


def test_vq_reports_block_calibration_and_both_baselines(vq_run):
    layers, reports = load_block_layers_of(vq_run, 1)
    for name, report in reports.items():
        assert report["block_error_after"] < report["block_error_before"]
        assert report["relative_error_after"] < report["relative_error_before"]  # VQ vs RTN at 2 bits
        # 2 bits of index plus a float32 codebook of 256 × 4, heavy beside a 128-wide tiny layer
        layer = layers[name]
        assert report["bits_per_weight"] == 2 + 256 * 4 * 32 / (layer.in_features * layer.out_features)
    methods = json.loads((vq_run / "validate" / "report.json").read_text())["methods"]
    assert set(methods) == {"vq4dit", "rtn", "kmeans"}
    assert methods["vq4dit"]["latent_error"] < methods["rtn"]["latent_error"]


@pytest.mark.slow
def test_sigkill_in_vq_quantize_then_rerun_gives_a_byte_identical_export(vq_run, vq_recipe, tmp_path):
    run = tmp_path / "run"
    args = ["quantize", "tiny-dit", "--recipe", vq_recipe, "--out", run]
    killed = _cli(args, {FAULT_VARIABLE: "quantize:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "quantize: resuming" in resumed.stderr
    assert export_file(run).read_bytes() == export_file(vq_run).read_bytes()


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "vq4dit", "--bits", "1"], "bits=1"),
    (["--method", "vq4dit", "--bits", "5"], "bits=5"),
    (["--method", "vq4dit", "--rank", "32"], "rank=32"),
    (["--method", "vq4dit", "--baselines", "smoothquant"], "smoothquant not available"),
    (["--method", "svdquant", "--bits", "2"], "bits=2"),
])
def test_bad_vq_input_is_one_line_and_exit_2(tmp_path, extra, message):
    code, _, stderr = svdq("quantize", "tiny-flux", "--out", tmp_path / "run", *extra)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], stderr


def test_a_vector_dimension_that_divides_no_k_leaves_nothing_to_quantize_and_is_refused_before_collect(tmp_path):
    recipe = tmp_path / "odd.yaml"
    recipe.write_text(RECIPE.replace("bits: 2,", "bits: 2, vq_dim: 3,"))
    code, _, stderr = svdq("quantize", "tiny-dit", "--recipe", recipe, "--out", tmp_path / "run")
    assert code == 2, stderr
    assert "stay 16-bit: their input width is not a multiple of the group size" in stderr
    assert "Error: no linear layer of tiny-dit is left to quantize; `svdq targets tiny-dit` shows why" in stderr
    assert not (tmp_path / "run" / "collect").exists()


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_one_process_vq_run_byte_for_byte(vq_run, vq_recipe, tmp_path):
    """Each rank samples its own prompts' block inputs; the smallest keys over both ranks are the one-process
    sample, so every artifact (collect to export) is the same bytes."""
    from tests.stages.test_torchrun import artifacts, torchrun

    run = tmp_path / "two"
    done = torchrun("quantize", "tiny-dit", "--recipe", vq_recipe, "--out", run)
    assert done.returncode == 0, done.stderr[-3000:]
    mine, reference = artifacts(run), artifacts(vq_run)
    assert sorted(mine) == sorted(reference)
    for name, data in reference.items():
        assert mine[name] == data, name
    assert not (run / "collect" / "calls.partial").exists()


@pytest.mark.slow
def test_validate_runs_vq_layers_through_vq_gemm_on_the_emulator(tmp_path, vq_recipe):
    """A bf16 VQ run validated with --runtime emulated: every VQ layer call goes through kernels/vq_gemm.cu, and
    layer by layer the kernel agrees with the reference path on the same inputs."""
    from svdq_cli.runtime.emulator.backend import EmulatorUnavailable, toolchain

    try:
        toolchain()
    except EmulatorUnavailable as missing:
        pytest.skip(str(missing))
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text(vq_recipe.read_text().replace("dtype: float32", "dtype: bfloat16"))
    run = tmp_path / "run"
    code, _, stderr = svdq("quantize", "tiny-dit", "--recipe", recipe, "--out", run, "--runtime", "emulated")
    assert code == 0, stderr
    check = json.loads((run / "validate" / "report.json").read_text())["kernels_vs_reference_path"]
    assert check["fused_calls"] > 0 and not check["reference_path_calls"], check
    assert check["worst_layer_snr_db"] >= 60, check


@pytest.mark.parametrize("family", ["tiny-flux", "tiny-pixart", "tiny-sana", "tiny-sd3"])
def test_vq4dit_runs_on_every_family(tmp_path, family):
    """Each family's blocks take other arguments (joint streams, rotary tuples, cross-attention masks, dicts):
    the recorded calls must replay to the same block outputs, and the export must load back."""
    recipe = tmp_path / "family.yaml"
    recipe.write_text(f"""
model: {family}
family: {family}
dtype: float32
device: cpu
quant: {{method: vq4dit, bits: 2, vq_steps: 4, vq_calls: 2, kmeans_iters: 2}}
calibration: {{num_prompts: 1, steps: 1, resolution: 64}}
validation: {{num_prompts: 1, steps: 1, resolution: 64}}
""")
    run = tmp_path / "run"
    code, _, stderr = svdq("quantize", family, "--recipe", recipe, "--out", run)
    assert code == 0, stderr
    transformer = load_quantized(export_file(run))
    assert any(isinstance(module, VQLinear) for module in transformer.modules())
