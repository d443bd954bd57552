"""`svdq validate --runtime emulated`: the quantized tiny-flux through the real kernels on the CPU emulator."""

import json
import shutil

import pytest
from torchmetrics.functional.image import peak_signal_noise_ratio

from svdq_cli.formats.svdq_file import load_quantized_pipeline
from svdq_cli.models.registry import ADAPTERS
from svdq_cli.quant.svdquant import fake_quantize_activations
from svdq_cli.runtime.emulator.backend import EmulatorUnavailable, toolchain
from svdq_cli.runtime.linear import SVDQLinear
from tests.conftest import svdq

try:
    toolchain()
except EmulatorUnavailable as missing:
    pytest.skip(str(missing), allow_module_level=True)


def float64_reference_forward(self, x):
    """The reference forward with float64 arithmetic: the same function, other roundings."""
    rows = x.reshape(-1, self.in_features).double()
    if self.shift is not None:
        rows = rows + self.shift.double()
    smoothed = rows / self.smooth.double()
    y = fake_quantize_activations(smoothed.float(), self.fmt, self.act).double() @ self.residual_weight().double().T
    if self.rank:
        y = y + (smoothed @ self.lora_down.double().T) @ self.lora_up.double().T
    if self.bias is not None:
        y = y + self.bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def test_validate_runs_the_kernels_and_matches_the_reference_path(bf16_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(bf16_run, run)
    code, stdout, stderr = svdq("validate", run, "--runtime", "emulated", "--json")
    assert code == 0, stderr
    report = json.loads((run / "validate" / "report.json").read_text())
    check = report["kernels_vs_reference_path"]
    assert report["runtime"].startswith("fused kernels on the CPU emulator") and check["fused_calls"] > 0
    assert set(check["reference_path_calls"]) == {"no fused kernel for int4 with activations 'none'"}  # AdaLN
    # Layer by layer, on the same inputs, the kernels agree with the reference path to ≥ 60 dB.
    assert check["worst_layer_snr_db"] >= 60, check
    # End to end, a quantized network amplifies last-bit differences: the kernels may move the images no more
    # than computing the reference path itself in float64 instead of float32 does (less 3 dB).
    export = json.loads((run / "manifest.json").read_text())["stages"]["export"]["file"]
    pipeline = load_quantized_pipeline(run / export)
    prompts, seeds = report["prompts"], report["seeds"]
    generate = lambda: ADAPTERS["tiny-flux"].generate(pipeline, prompts, seeds, 2, 3.5, 64).float().clamp(0, 1)  # noqa: E731
    float32 = generate()
    monkeypatch.setattr(SVDQLinear, "reference_forward", float64_reference_forward)
    floor = peak_signal_noise_ratio(generate(), float32, data_range=1.0).item()
    assert check["psnr"] >= floor - 3.0, (check["psnr"], floor)
    assert "worst layer" in (run / "validate" / "report.md").read_text()
    assert json.loads(stdout)["validate"]["kernels_vs_reference_path"]["fused_calls"] == check["fused_calls"]
