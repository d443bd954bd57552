import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from svdq_cli.formats.svdq_file import load_quantized_pipeline, read_metadata
from svdq_cli.models.registry import ADAPTERS
from svdq_cli.run.directory import FAULT_VARIABLE
from svdq_cli.runtime.linear import SVDQLinear
from svdq_cli.stages.base import ORDER
from tests.conftest import svdq


def export_file(run):
    manifest = json.loads((run / "manifest.json").read_text())
    return run / manifest["stages"]["export"]["file"]


def test_finished_run_has_every_artifact(finished_run):
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ORDER] == ["done"] * 6
    for stage in ("collect", "smooth", "svd", "quantize"):
        assert len(manifest["stages"][stage]["artifacts"]) == 6  # 2 double + 4 single blocks
    for name in ("report.json", "report.md", "comparison.png", "layers.png"):
        assert (finished_run / "validate" / name).stat().st_size > 0
    assert export_file(finished_run).name == "svdq-int4_r16-tiny-flux.safetensors"
    assert set(manifest["versions"]) >= {"svdq", "torch", "diffusers", "transformers"}


def test_rerunning_a_finished_run_does_nothing_and_says_so(run_copy, recipe_file):
    before = export_file(run_copy).read_bytes()
    code, stdout, _ = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run_copy, "--json")
    assert code == 0
    result = json.loads(stdout)
    assert all(stage["status"] == "up to date" for stage in result["stages"].values())
    code, stdout, _ = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run_copy)
    assert "nothing to do" in stdout
    assert export_file(run_copy).read_bytes() == before


def test_changing_the_rank_reruns_from_smooth_not_collect(run_copy, recipe_file):
    code, stdout, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run_copy, "--rank", "32",
                                "--json")
    assert code == 0, stderr
    stages = json.loads(stdout)["stages"]
    assert stages["collect"]["status"] == "up to date"
    assert all(stages[s]["status"] == "done" for s in ("smooth", "svd", "quantize", "validate", "export"))
    assert read_metadata(export_file(run_copy).with_name("svdq-int4_r32-tiny-flux.safetensors"))[
        "quantization_config"]["rank"] == 32


def test_a_tampered_artifact_is_detected_and_recomputed(run_copy, recipe_file):
    expected = export_file(run_copy).read_bytes()
    block = run_copy / "svd" / "block-002.safetensors"
    data = bytearray(block.read_bytes())
    data[-5] ^= 0xFF
    block.write_bytes(bytes(data))
    code, stdout, _ = svdq("status", run_copy)
    assert "BROKEN" in stdout
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run_copy)
    assert code == 0
    assert "svd/block-002.safetensors is missing or does not match its checksum; recomputing it" in stderr
    assert export_file(run_copy).read_bytes() == expected
    (run_copy / "quantize" / "block-001.safetensors").write_bytes(b"truncated")
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run_copy)
    assert code == 0 and "quantize/block-001.safetensors" in stderr
    assert export_file(run_copy).read_bytes() == expected
    (run_copy / "smooth" / "block-004.safetensors").unlink()
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run_copy)
    assert code == 0 and "smooth/block-004.safetensors is missing or does not match its checksum" in stderr
    assert export_file(run_copy).read_bytes() == expected


def _cli(args, env_extra=None):
    # No timeout: on a loaded machine a slow run is not a failure (the work is bounded by the tiny recipe).
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "svdq_cli", *map(str, args)], capture_output=True, text=True,
                          env=env)


@pytest.mark.slow
@pytest.mark.parametrize("stage,after", [("collect", 2), ("smooth", 3), ("svd", 3), ("quantize", 4),
                                         ("validate", 2), ("export", 1)])
def test_sigkill_in_a_stage_then_rerun_gives_a_byte_identical_export(finished_run, recipe_file, tmp_path, stage,
                                                                      after):
    run = tmp_path / "run"
    args = ["quantize", "tiny-flux", "--recipe", recipe_file, "--out", run]
    killed = _cli(args, {FAULT_VARIABLE: f"{stage}:{after}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"][stage]["status"] == "running"
    status = _cli(["status", run])
    assert status.returncode == 0 and f"{stage}" in status.stdout and "interrupted" in status.stdout
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert export_file(run).read_bytes() == export_file(finished_run).read_bytes()


def test_gate_failure_exits_3(run_copy):
    code, _, stderr = svdq("validate", run_copy, "--min-psnr", "500")
    assert code == 3
    assert stderr.strip().splitlines()[-1].startswith("Error: validation gate failed (min_psnr: ")
    assert "Traceback" not in stderr
    report = json.loads((run_copy / "validate" / "report.json").read_text())
    assert report["gates"]["min_psnr"]["passed"] is False


def test_validate_with_baselines_reports_them(run_copy):
    code, stdout, stderr = svdq("validate", run_copy, "--baselines", "rtn,w4a16,nf4", "--json")
    assert code == 0, stderr
    report = json.loads((run_copy / "validate" / "report.json").read_text())
    assert set(report["methods"]) == {"svdquant", "rtn", "w4a16", "nf4"}
    for values in report["methods"].values():
        assert values["psnr"] > 10 and 0 < values["ssim"] <= 1 and values["latent_error"] >= 0
    assert report["methods"]["svdquant"]["latent_error"] < report["methods"]["rtn"]["latent_error"]
    # weight-only 4-bit keeps 16-bit activations: closer than naive W4A4, whatever the 4-bit weight format
    assert report["methods"]["nf4"]["latent_error"] < report["methods"]["rtn"]["latent_error"]


def test_export_loads_back_and_reproduces_the_validated_model(finished_run):
    path = export_file(finished_run)
    pipeline = load_quantized_pipeline(path)
    quantized = [m for m in pipeline.transformer.modules() if isinstance(m, SVDQLinear)]
    assert len(quantized) == 52
    report = json.loads((finished_run / "validate" / "report.json").read_text())
    adapter = ADAPTERS["tiny-flux"]
    image = adapter.generate(pipeline, report["prompts"][:1], report["seeds"][:1], 2, 3.5, 64)
    reference = adapter.generate(adapter.build_tiny(0, torch.float32), report["prompts"][:1], report["seeds"][:1],
                                 2, 3.5, 64)
    from torchmetrics.functional.image import peak_signal_noise_ratio

    psnr = peak_signal_noise_ratio(image.clamp(0, 1), reference.clamp(0, 1), data_range=1.0).item()
    assert psnr == pytest.approx(report["methods"]["svdquant"]["per_prompt"][0]["psnr"], abs=1e-3)


def test_inspect_and_status(finished_run):
    code, stdout, _ = svdq("inspect", export_file(finished_run), "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["precision"] == "int4" and info["rank"] == 16 and info["quantized_layers"] == 52
    assert info["bytes"] < info["bytes_bf16"]
    to_q = next(layer for layer in info["layers"] if layer["name"] == "transformer_blocks.0.attn.to_q")
    # qweight 128×64 + bf16-or-fp32 scales, λ, branch, bias: far below the 128×128 float32 weight
    assert to_q["in_features"] == 128 and to_q["rank"] == 16 and 8192 < to_q["bytes"] < 128 * 128 * 4
    code, stdout, _ = svdq("inspect", export_file(finished_run))
    assert code == 0 and "quantized layers" in stdout and "× smaller" in stdout
    code, stdout, _ = svdq("status", finished_run, "--json")
    assert code == 0 and [s["status"] for s in json.loads(stdout)["stages"]] == ["done"] * 6


def _default_sigint() -> None:
    # A runner that started us in the background (nohup, `cmd &`) leaves SIGINT ignored, and children inherit
    # that; svdq under test must see Ctrl-C as a user's shell delivers it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_through_a_pipe(args, env, how=signal.SIGINT):
    process = subprocess.Popen([sys.executable, "-m", "svdq_cli", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint)
    for line in process.stderr:  # the fault hook says when it waits: a known point, no sleeping
        if line.startswith("fault hook: paused"):
            process.send_signal(how)
            break
    stderr = process.stderr.read()
    process.wait()
    return process.returncode, stderr


def _interrupt_in_a_terminal(args, env):
    import pty

    pid, terminal = pty.fork()
    if pid == 0:  # the child: svdq on a terminal, as a user runs it
        _default_sigint()
        os.execve(sys.executable, [sys.executable, "-m", "svdq_cli", *map(str, args)], env)
    output = b""
    while b"fault hook: paused" not in output:
        output += os.read(terminal, 4096)
    os.write(terminal, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the foreground process group
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["pipe", "terminal", "sigterm"])
def test_ctrl_c_or_sigterm_exits_with_one_line_and_a_rerun_resumes_to_the_same_export(finished_run, recipe_file,
                                                                                     tmp_path, how):
    run = tmp_path / "run"
    args = ["quantize", "tiny-flux", "--recipe", recipe_file, "--out", run]
    env = {**os.environ, FAULT_VARIABLE: "smooth:2:pause"}
    if how == "terminal":
        code, output = _interrupt_in_a_terminal(args, env)
    else:
        code, output = _interrupt_through_a_pipe(args, env, signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    expected = (143, "Error: terminated (SIGTERM); re-run the same command to resume") if how == "sigterm" else \
        (130, "Error: interrupted; re-run the same command to resume")
    assert code == expected[0], output[-2000:]
    assert "Traceback" not in output
    assert expected[1] in output
    assert not list(run.rglob("*.tmp")), "a half-written temporary file was left behind"
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "smooth: resuming" in resumed.stderr
    assert export_file(run).read_bytes() == export_file(finished_run).read_bytes()
